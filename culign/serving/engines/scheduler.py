"""The decode scheduler: the one thread that runs the model for the service.

Iteration-level (continuous) batching, as in Orca, vLLM and TGI. Between two decode steps, waiting requests are
prefilled, each alone, and join the running batch. A row that has finished, was cancelled (its client went away,
or a stop string matched) or failed leaves at once, and its cache is freed. Every row keeps its own soft prompt,
sampling settings and random stream, so a request gets the same greedy tokens whoever it shares the batch with
(tested; what holds in bf16 is measured in bench/serve.py).

Bounded: at most ``max_rows`` rows in flight and ``max_queue`` waiting. Past that ``submit`` raises
:class:`QueueFull` at once; it never blocks. A row whose sampling fails fails alone. A failing forward pass fails
the rows in it, not the thread. ``close`` stops admitting, gives running rows ``grace`` seconds, then ends them
with :class:`ShuttingDown`.

Knows nothing of HTTP: the chat service maps these exceptions to statuses. :class:`StaticBatcher` is the previous
design (gather for a few ms, decode that batch to its end), kept as the baseline bench/serve.py measures against.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import torch

from ...model import decoding
from ...model.decoding import DecodeBatch, GenerationRequest
from ...model.hardware import cpu_flags
from ...model.runtime import Runtime
from .base import Invariance, Job, QueueFull, RowFailed, ShuttingDown, Stats, Token

__all__ = ["Scheduler", "StaticBatcher", "COMPUTE_THREADS", "Job", "QueueFull", "RowFailed", "ShuttingDown", "Stats",
           "Token"]

log = logging.getLogger("culign.scheduler")
COMPUTE_THREADS = torch.get_num_threads()  # torch's own choice, taken before the service narrows its loading thread
# Test hook: while this names a file, the decode thread raises at its next iteration once the file appears (and
# removes it), so a live server's engine death can be caused on purpose (tests/test_engine_faults.py).
FAULT_FILE_ENV = "CULIGN_TEST_DECODE_FAULT_FILE"
# Test hook: while this names a file that exists, starting the engine fails (as a start with no memory left would)
START_FAULT_FILE_ENV = "CULIGN_TEST_ENGINE_START_FAULT_FILE"


class InjectedFault(BaseException):
    """Raised in the decode thread by the test hook: past every per-row ``except Exception``, so the thread dies as
    it would on a bug in the loop itself."""


@dataclass
class _Row:
    job: Job
    gen: torch.Generator | None
    last: int  # the token fed at the next step


class _WorkerBase:
    """The thread, the bounded inbox and the stats shared by both schedulers (culign's side of the engine seam)."""
    name = "culign"

    def __init__(self, runtime: Runtime, max_rows: int, max_queue: int, threads: int, grace: float, name: str):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows}, {max_queue}")
        start_fault = os.environ.get(START_FAULT_FILE_ENV)
        if start_fault and os.path.exists(start_fault):
            raise RuntimeError(f"engine start failed (injected through {START_FAULT_FILE_ENV})")
        self.runtime, self.max_rows, self.max_queue = runtime, max_rows, max_queue
        self.threads, self.grace = threads, grace
        self.stats = Stats()
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._running: set[Job] = set()  # jobs with a row in the batch: ended by the thread, even when it dies
        self._lock = threading.Lock()
        self._closing_at: float | None = None
        self._stopped = False  # the thread has ended (or died): nothing submitted any more would ever be decoded
        self.death: str | None = None  # why the thread died (None: it has not, or it ended by close())
        self._fault_file = os.environ.get(FAULT_FILE_ENV) or None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._inbox.qsize()

    def submit(self, request: GenerationRequest, label: str = "", region: str | None = None) -> Job:
        """Queue a request; call from inside the event loop that will read the job's tokens. Never blocks."""
        if self._closing_at is not None:
            raise ShuttingDown("the server is shutting down")
        with self._lock:
            if self._stopped:
                raise RowFailed(f"generation failed: the decode thread stopped ({self.death})")
            if self._inbox.qsize() >= self.max_queue + max(0, self.max_rows - self.stats.rows_in_flight):
                self.stats.rejected += 1
                raise QueueFull(self._inbox.qsize(), self.stats.retry_after(self._inbox.qsize()))
            job = Job(request, self.runtime.stop_ids, asyncio.get_running_loop(), label, region)
            self._inbox.put(job)
        self._wake.set()
        return job

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped and self._closing_at is None

    def invariance(self) -> Invariance:
        """Measured in bench/serve.py (random mixes, each greedy answer against the same request alone)."""
        rt = self.runtime
        if rt.dtype == torch.float32:
            return Invariance(True, "float32: batched decode steps round as alone (0 of 76 answers differed)")
        if rt.batch_invariant:
            name = str(rt.dtype).replace('torch.', '')
            if rt.device.type == "cpu" and "amx_bf16" in cpu_flags():
                return Invariance(True, f"{name} with row-wise decode attention (CULIGN_BATCH_INVARIANT): 0 of 76 "
                                        "answers differed (Xeon with AMX)")
            # measured where it fails: AVX512-BF16 without AMX (AMD EPYC, 2026-12-04); not measured on GPUs
            return Invariance(False, f"{name} with row-wise decode attention: 7 of 76 greedy answers differed on "
                                     "a CPU with AVX512-BF16 and no AMX (invariant, 0 of 76, only measured with "
                                     "AMX; not measured on GPUs); use CULIGN_DTYPE=float32 for invariance")
        return Invariance(False, f"{str(rt.dtype).replace('torch.', '')} with batched attention "
                                 "(CULIGN_BATCH_INVARIANT=0): 5 of 76 greedy answers differed from the same request "
                                 "alone")

    def close(self) -> None:
        """Stop admitting; rows still running get ``grace`` seconds, then end with ShuttingDown."""
        if self._closing_at is None:
            self._closing_at = time.monotonic()
        self._wake.set()
        self._thread.join(timeout=self.grace + 5)

    def _closing(self) -> bool:
        return self._closing_at is not None

    def _past_grace(self) -> bool:
        return self._closing_at is not None and time.monotonic() - self._closing_at >= self.grace

    def _drain_inbox(self, error: BaseException) -> None:
        while True:
            try:
                self._inbox.get_nowait()._finish(error)
            except queue.Empty:
                return

    def _take(self, block: bool) -> Job | None:
        """The next waiting job that nobody cancelled; waits for one when ``block`` (waking to check closing)."""
        while True:
            try:
                job = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and not self._closing():
                    continue
                return None
            if job.cancelled:
                self._end_cancelled(job)
                continue
            return job

    def _end_cancelled(self, job: Job) -> None:
        """A job its caller gave up on (client gone, stop string): end its stream and count it once."""
        if not job.finished:
            self.stats.cancelled_rows += 1
            job._finish()

    def _main(self) -> None:
        torch.set_num_threads(self.threads)  # per thread under OpenMP: see engines.load_runtime
        end: BaseException = ShuttingDown("the server is shutting down")
        try:
            self._run()
        except BaseException as e:  # never expected: logged, and every request it held ends now (never a hang)
            log.exception("the decode worker stopped")
            self.death = f"{type(e).__name__}: {e}"
            end = RowFailed(f"generation failed: the decode thread stopped ({type(e).__name__})")
        finally:
            with self._lock:
                self._stopped = True  # submit refuses from here on, so the drain below is the last one
            for job in list(self._running):
                job._finish(end)
            self._running.clear()
            self.stats.rows_in_flight = 0
            self._drain_inbox(end)

    def _check_fault(self) -> None:
        if self._fault_file is not None and os.path.exists(self._fault_file):
            os.unlink(self._fault_file)
            raise InjectedFault(f"injected through {FAULT_FILE_ENV}")

    def _run(self) -> None:
        raise NotImplementedError

    def _count(self, job: Job) -> None:
        self.stats.requests_by_region[job.region or "base"] += 1


class Scheduler(_WorkerBase):
    """Continuous batching: rows join at the next step and leave at once (see the module docstring)."""

    def __init__(self, runtime: Runtime, max_rows: int = 16, max_queue: int = 64, threads: int = COMPUTE_THREADS,
                 grace: float = 2.0):
        if not decoding.decodes_incrementally(runtime):
            raise ValueError(f"{runtime.name} has sliding-window cache layers: use StaticBatcher")
        super().__init__(runtime, max_rows, max_queue, threads, grace, "culign-scheduler")

    def _run(self) -> None:
        rt = self.runtime
        rows: list[_Row] = []
        batch: DecodeBatch | None = None
        while True:
            self._check_fault()
            if self._closing():
                self._drain_inbox(ShuttingDown("the server is shutting down"))
                if not rows:
                    return
                if self._past_grace():
                    for row in rows:
                        row.job._finish(ShuttingDown("the server shut down before this answer was complete"))
                    log.info("shutdown: ended %d unfinished rows", len(rows))
                    return
            # admit: prefill waiting requests (each alone) until the batch is full
            while len(rows) < self.max_rows and not self._closing():
                job = self._take(block=not rows)
                if job is None:
                    break
                self._count(job)
                one = self._prefill(job)
                if one is None:
                    continue
                row, single = one
                if batch is None:
                    batch = single
                else:
                    batch.merge(single)
                rows.append(row)
                self._running.add(job)
                log.debug("row %s joined: %d in flight [%s], %d waiting", job.label, len(rows),
                          ", ".join(r.job.label for r in rows), self.queued)
            self.stats.rows_in_flight = len(rows)
            if not rows:
                batch = None
                if self._closing():
                    return
                continue
            # one decode step for every row
            try:
                decoding.decode_step(rt, batch, [r.last for r in rows])
            except Exception as e:
                log.exception("a decode step of %d rows failed", len(rows))
                for row in rows:
                    row.job._finish(RowFailed(f"generation failed: {type(e).__name__}"))
                    self.stats.failed_rows += 1
                rows, batch = [], None
                self._running.clear()
                continue
            produced = sum(self._emit(row, batch.logits[i]) for i, row in enumerate(rows) if not row.job.done)
            self.stats.record_step(len(rows), produced)
            keep = [i for i, r in enumerate(rows) if not r.job.done]
            if len(keep) < len(rows):
                for r in rows:
                    if r.job.done:
                        if r.job.cancelled:
                            self._end_cancelled(r.job)
                        log.debug("row %s left after %d tokens", r.job.label, r.job.produced)
                rows = [rows[i] for i in keep]
                self._running = {r.job for r in rows}
                if rows:
                    batch.keep(keep)
                else:
                    batch = None
                self.stats.rows_in_flight = len(rows)

    def _prefill(self, job: Job) -> tuple[_Row, DecodeBatch] | None:
        """The job's prompt through the model alone and its first token; None when it failed or is done already."""
        rt = self.runtime
        try:
            single = decoding.prefill(rt, job.request)
            row = _Row(job, decoding.sampler(rt, job.request), -1)
        except Exception as e:  # this request alone: its neighbours never see it
            log.exception("prefill of %s failed", job.label)
            job._finish(RowFailed(f"generation failed: {type(e).__name__}"))
            self.stats.failed_rows += 1
            return None
        self.stats.prefills += 1
        if job.request.max_new_tokens <= 0:
            job._finish()
            return None
        if not self._emit(row, single.logits[0]):
            return None
        self.stats.tokens += 1
        if job.cancelled and not job.finished:  # its client left while it was being prefilled
            self._end_cancelled(job)
            log.debug("row %s cancelled before joining", job.label)
        return (row, single) if not job.done else None

    def _emit(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick and push the row's next token; a failure fails this row only."""
        try:
            token = decoding.next_token(logits, row.job.request, row.gen)
        except Exception as e:
            log.exception("sampling for %s failed", row.job.label)
            row.job._finish(RowFailed(f"sampling failed: {type(e).__name__}"))
            self.stats.failed_rows += 1
            return False
        row.last = token.id
        row.job._push(token)
        return True


class StaticBatcher(_WorkerBase):
    """The baseline: take the first waiting request, gather what else arrives within ``window`` seconds, decode
    that batch to its end with :func:`culign.model.decoding.generate_stream` (tokens with their logprobs, as the
    continuous scheduler gives them); requests arriving meanwhile wait for the next batch."""

    def __init__(self, runtime: Runtime, max_rows: int = 16, max_queue: int = 64, threads: int = COMPUTE_THREADS,
                 grace: float = 2.0, window: float = 0.005):
        self.window = window
        super().__init__(runtime, max_rows, max_queue, threads, grace, "culign-static-batcher")

    def _run(self) -> None:
        while not self._closing():
            self._check_fault()
            first = self._take(block=True)
            if first is None:
                continue
            batch, deadline = [first], time.monotonic() + self.window
            while len(batch) < self.max_rows and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.001))
                job = self._take(block=False)
                if job is not None:
                    batch.append(job)
            for job in batch:
                self._count(job)
            self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        self.stats.rows_in_flight = len(batch)
        self._running = set(batch)
        try:
            for step in decoding.generate_stream(self.runtime, [j.request for j in batch]):
                self._check_fault()
                live = sum(t is not None for t in step)
                self.stats.record_step(live, live)
                for job, token in zip(batch, step):
                    if token is not None and not job.done:
                        job._push(token)
                if self._past_grace():
                    raise ShuttingDown("the server shut down before this answer was complete")
        except Exception as e:  # the static design cannot isolate rows: the whole batch fails
            log.exception("decoding a batch of %d failed", len(batch))
            err = e if isinstance(e, ShuttingDown) else RowFailed(f"generation failed: {type(e).__name__}")
            for job in batch:
                job._finish(err)
        for job in batch:
            job._finish()
        self._running = set()
        self.stats.rows_in_flight = 0
