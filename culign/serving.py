"""Serving logic behind ``service.py``: region selection, the hot adapter cache, the micro-batching decode worker,
chat-request validation and the reply bodies (``/chat`` and OpenAI-shaped).

Knows nothing of BentoML or of any HTTP framework: a handler gives :class:`ChatEngine` the parsed body and the
region header, and gets back a :class:`Reply` (status, JSON body or a stream of SSE lines, headers).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Sequence

import torch
from pydantic import BaseModel

from . import targets
from .registry import AdapterInfo, Registry, RegistryError
from .runtime import GenerationRequest, Runtime

log = logging.getLogger("culign.serving")

REGION_HEADER = "X-Culign-Region"
VERSION_HEADER = "X-Culign-Adapter"  # response header: which adapter served the request ("US@2" or "none")
REGION_SPEC_RE = re.compile(r"[A-Za-z0-9_-]{1,64}(?:@[0-9]+)?")  # used with fullmatch: no trailing-newline slip
COMPUTE_THREADS = torch.get_num_threads()  # torch's own choice, taken before load_runtime narrows this thread


def load_runtime(**kwargs: Any) -> Runtime:
    """``Runtime.load`` for serving: this (the loading) thread then computes on one thread, the decode worker on all.

    torch's OpenMP (libgomp) throttles its spin-waiting once more OpenMP threads exist than cores. A loading thread
    that kept a team of its own would push the decode worker's team over that line, and a decode step is thousands
    of tiny parallel regions: on 2 cores every token took 1.5x as long in the worker thread as in the main one
    (measured). Loading single-threaded leaves the worker's team the only one.
    """
    torch.set_num_threads(1)
    return Runtime.load(**kwargs)


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


# ---------------------------------------------------------------------------------------------------- errors
class ServingError(Exception):
    """A request the service refuses, with the HTTP status and an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", **extra: Any):
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status, **self.extra}}


def _show(value: str, limit: int = 40) -> str:
    """A request value safe to echo in an error: repr (control characters escaped), truncated."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))


# ---------------------------------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class RegionSpec:
    name: str
    version: int | None = None  # None = latest


def parse_region(value: str, source: str = REGION_HEADER) -> RegionSpec:
    """``"US"``, ``"china@2"`` -> RegionSpec. Anything else (paths, control characters, long values) -> 400.

    The name never reaches the filesystem as given: it is only compared with names the registry listed itself.
    """
    if not REGION_SPEC_RE.fullmatch(value):
        raise ServingError(400, f"bad region {_show(value)} in {source}: expected NAME or NAME@VERSION, NAME being "
                                "1-64 letters, digits, '_' or '-'", param=source)
    name, _, version = value.partition("@")
    return RegionSpec(name, int(version) if version else None)


@dataclass(frozen=True)
class Adapter:
    """A verified soft prompt, ready on the runtime's device and dtype."""
    info: AdapterInfo
    prompt: torch.Tensor  # [n, hidden]

    @property
    def ref(self) -> str:
        return self.info.ref


class AdapterCache:
    """(region, version) -> verified soft prompt, over a registry that may change while we serve.

    The registry listing is rescanned every ``rescan_every`` seconds and whenever a request names a region or version
    the last scan did not have, so an adapter trained while the service runs is served without a restart and a new
    version becomes ``latest``. Adapters that fail integrity or compatibility checks are refused (logged once) and
    skipped; they never reach the model.
    """

    def __init__(self, registry: Registry, runtime: Runtime, rescan_every: float = 5.0, max_loaded: int = 256):
        self.registry, self.runtime = registry, runtime
        self.rescan_every, self.max_loaded = rescan_every, max_loaded
        self._lock = threading.RLock()
        self._infos: dict[str, dict[int, AdapterInfo]] = {}  # region -> version -> info, from the last scan
        self._scanned_at = float("-inf")
        self._warned: set[str] = set()
        # Keyed by the scanned info, not (region, version): a removed version's number can be reused by a new save.
        self._loaded: OrderedDict[AdapterInfo, Adapter] = OrderedDict()  # LRU
        self._refused: dict[AdapterInfo, str] = {}
        self._forced_at = float("-inf")

    # ------------------------------------------------------------------ listing
    def rescan(self) -> None:
        infos, warnings = self.registry.scan()
        table: dict[str, dict[int, AdapterInfo]] = {}
        for info in infos:
            table.setdefault(info.region, {})[info.version] = info
        with self._lock:
            self._infos, self._scanned_at = table, time.monotonic()
        for w in warnings:
            if w not in self._warned:  # a broken folder would otherwise be logged on every rescan
                self._warned.add(w)
                log.warning("registry: %s", w)

    def _fresh(self) -> None:
        if time.monotonic() - self._scanned_at >= self.rescan_every:
            self.rescan()

    def _rescan_for_unknown(self) -> None:
        # A request naming something unknown may name an adapter saved a moment ago; the short floor keeps a flood
        # of bad names from turning into a flood of directory scans.
        if time.monotonic() - self._forced_at >= 0.2:
            self._forced_at = time.monotonic()
            self.rescan()

    def available(self) -> dict[str, list[int]]:
        """Region -> servable versions (ascending), refused ones left out."""
        self._fresh()
        with self._lock:
            return {r: [v for v, info in sorted(vs.items()) if info not in self._refused]
                    for r, vs in sorted(self._infos.items())}

    def _canonical(self, name: str) -> str | None:
        """The registry's own spelling of a region: its name case-insensitively, else the CLI's alias lookup."""
        by_lower = {r.lower(): r for r in self._infos}
        if name.lower() in by_lower:
            return by_lower[name.lower()]
        try:
            key = targets.resolve(name).key  # "China", "CHI", "cn" -> "CN"
        except ValueError:  # UnknownRegionError is a ValueError
            return None
        return by_lower.get(key.lower())

    # ------------------------------------------------------------------ lookup
    def lookup(self, spec: RegionSpec, source: str = REGION_HEADER) -> Adapter:
        """The adapter a request asked for; ServingError 404 (listing what is available, naming ``source``: the
        header or the ``model`` field) when there is none."""
        self._fresh()
        with self._lock:
            region = self._canonical(spec.name)
            if region is None or (spec.version is not None and spec.version not in self._infos[region]):
                self._rescan_for_unknown()  # maybe trained since the last scan
                region = self._canonical(spec.name)
            if region is None:
                raise self._not_found(f"unknown region {_show(spec.name)} in {source}", source)
            if spec.version is not None:
                if spec.version not in self._infos[region]:
                    raise self._not_found(f"region {region} has no version {spec.version} (in {source})", source)
                adapter = self._load(self._infos[region][spec.version])
                if adapter is None:
                    raise self._not_found(f"adapter {region}@{spec.version} is refused: it failed the integrity "
                                          "or compatibility checks (the server log says why)", source)
                return adapter
            for version in sorted(self._infos[region], reverse=True):  # latest that passes the checks
                adapter = self._load(self._infos[region][version])
                if adapter is not None:
                    return adapter
            raise self._not_found(f"region {region} is refused: every version failed the integrity or "
                                  "compatibility checks (the server log says why)", source)

    def _not_found(self, message: str, source: str = REGION_HEADER) -> ServingError:
        available = [r for r, vs in self.available().items() if vs]
        return ServingError(404, f"{message}; available regions: {', '.join(available) or 'none'}",
                            kind="not_found_error", param=source, available=available)

    def _load(self, info: AdapterInfo) -> Adapter | None:
        if info in self._loaded:
            self._loaded.move_to_end(info)
            return self._loaded[info]
        if info in self._refused:
            return None
        try:
            loaded = self.registry.load(info.region, info.version, hidden_size=self.runtime.hidden_size,
                                        base_fingerprint=self.runtime.fingerprint)
        except (RegistryError, OSError, ValueError) as e:  # corrupt, incompatible, vanished, unreadable
            self._refused[info] = str(e)
            log.warning("refusing adapter %s: %s", info.ref, e)
            return None
        adapter = Adapter(loaded.info, loaded.prompt.to(self.runtime.device, self.runtime.dtype))
        self._loaded[info] = adapter
        if len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return adapter

    def warm(self) -> None:
        """Load (and so verify) the latest adapter of every region now, so refusals show in the startup log."""
        for region in self.available():
            try:
                self.lookup(RegionSpec(region))
            except ServingError as e:
                log.warning("%s", e.message)


# ---------------------------------------------------------------------------------------------------- decoding
_END = object()


class Job:
    """One request in the decode worker: its tokens arrive on an asyncio queue owned by the caller's event loop."""

    def __init__(self, request: GenerationRequest, stop_ids: set[int], loop: asyncio.AbstractEventLoop,
                 label: str = ""):
        self.request, self._stop_ids, self._loop, self.label = request, stop_ids, loop, label
        self._queue: asyncio.Queue = asyncio.Queue()
        self.produced = 0
        self.finished = False
        self.cancelled = False  # set by the caller when nobody waits for the tokens any more

    # worker thread side
    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is listening
            self.cancelled = True

    def _push(self, token: int) -> None:
        self.produced += 1
        self._put(token)
        if token in self._stop_ids or self.produced >= self.request.max_new_tokens:
            self._finish()  # end this stream now, not when the batch's longest row ends

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            if error is not None:
                self._put(error)
            self._put(_END)

    # caller side
    async def tokens(self) -> AsyncIterator[int]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class BatchWorker:
    """The one thread that runs the model.

    It takes the first waiting request, gathers whatever else arrives within ``window`` seconds (up to ``max_batch``
    rows), and decodes them together with ``Runtime.generate_stream``: one forward per step for all rows, whatever
    soft prompt each row carries. Requests that arrive meanwhile wait for the next batch (the runtime cannot add
    rows to a running decode).
    """

    def __init__(self, runtime: Runtime, window: float = 0.005, max_batch: int = 16, threads: int = COMPUTE_THREADS):
        self.runtime, self.window, self.max_batch, self.threads = runtime, window, max_batch, threads
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # decoded batches, and their total rows: for tests and the bench
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="culign-decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, label: str = "") -> Job:
        """Queue a request; call from inside the event loop that will read the job's tokens."""
        job = Job(request, self.runtime.stop_ids, asyncio.get_running_loop(), label)
        self._inbox.put(job)
        return job

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                job = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # close() while gathering: finish this batch first
                self._inbox.put(None)
                break
            batch.append(job)
        return [j for j in batch if not j.cancelled]

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # per thread under OpenMP: see load_runtime
        while (first := self._inbox.get()) is not None:
            batch = self._gather(first)
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        self.batches += 1
        self.rows += len(batch)
        t0, steps = time.perf_counter(), 0
        try:
            for step in self.runtime.generate_stream([j.request for j in batch]):
                steps += 1
                for job, token in zip(batch, step):
                    if token is not None:
                        job._push(token)
        except Exception as e:  # keep serving: this batch fails, the next one may not
            log.exception("decoding a batch of %d failed", len(batch))
            for job in batch:
                job._finish(ServingError(503, f"generation failed: {type(e).__name__}", kind="server_error"))
        for job in batch:
            job._finish()
        log.info("decoded a batch of %d rows [%s]: %d steps, %d tokens in %.2f s", len(batch),
                 ", ".join(j.label for j in batch), steps, sum(j.produced for j in batch),
                 time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- requests
class ContentPart(BaseModel):
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    """``POST /chat``. Unknown fields are ignored; values are checked by :meth:`ChatEngine.prepare`."""
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


class ChatCompletionRequest(ChatRequest):
    """``POST /v1/chat/completions``: the OpenAI fields we honour (others, e.g. ``user``, are ignored)."""
    model: str | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None


@dataclass
class Prepared:
    """A validated request, ready for the decode worker."""
    request: GenerationRequest
    adapter: Adapter | None
    prompt_tokens: int

    @property
    def region(self) -> str | None:
        return self.adapter.info.region if self.adapter else None

    @property
    def version(self) -> int | None:
        return self.adapter.info.version if self.adapter else None

    @property
    def served_by(self) -> str:
        return self.adapter.ref if self.adapter else "none"


@dataclass
class Reply:
    """What a handler sends back: a JSON body, or SSE lines (``stream``) with status 200."""
    status: int = 200
    body: dict | None = None
    stream: AsyncIterator[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Detokenizer:
    """Token ids -> text deltas, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # a multi-byte character in progress: wait for its next token
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.text()
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


# ---------------------------------------------------------------------------------------------------- engine
class ChatEngine:
    """Everything the HTTP handlers need: validation, region selection, batched generation, reply bodies."""

    def __init__(self, runtime: Runtime, registry: Registry, *, max_tokens_cap: int | None = None,
                 default_max_tokens: int = 128, rescan_every: float | None = None, batch_window: float | None = None,
                 max_batch: int | None = None, worker: BatchWorker | None = None):
        self.runtime = runtime
        self.max_tokens_cap = int(max_tokens_cap or _env_number("CULIGN_MAX_TOKENS", 512))
        self.default_max_tokens = default_max_tokens
        self.adapters = AdapterCache(registry, runtime, rescan_every if rescan_every is not None
                                     else _env_number("CULIGN_RESCAN_SECONDS", 5.0))
        self.worker = worker or BatchWorker(
            runtime, batch_window if batch_window is not None else _env_number("CULIGN_BATCH_WINDOW_MS", 5) / 1000,
            int(max_batch or _env_number("CULIGN_MAX_BATCH", 16)))
        self.created = int(time.time())
        base = runtime.name
        self.base_names = {base, base.split(":", 1)[-1], base.rstrip("/").rsplit("/", 1)[-1]}

    # ------------------------------------------------------------------ endpoints
    async def chat(self, body: ChatRequest, region_header: Sequence[str]) -> Reply:
        """``POST /chat`` -> ``{region, adapter_version, message, usage, finish_reason}``."""
        try:
            prepared = self.prepare(body, region_header)
            result = await self.generate(prepared)
        except ServingError as e:
            return self.error(e)
        return Reply(body={"region": prepared.region, "adapter_version": prepared.version,
                           "message": {"role": "assistant", "content": result.text},
                           "finish_reason": result.finish_reason, "usage": result.usage()},
                     headers={VERSION_HEADER: prepared.served_by})

    async def chat_completions(self, body: ChatCompletionRequest, region_header: Sequence[str]) -> Reply:
        """``POST /v1/chat/completions``, OpenAI-compatible; ``stream: true`` gives SSE chunks and ``[DONE]``."""
        try:
            prepared = self.prepare(body, region_header, model=body.model)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return Reply(stream=self._sse(prepared, include_usage), headers={VERSION_HEADER: prepared.served_by})
            result = await self.generate(prepared)
        except ServingError as e:
            return self.error(e)
        return Reply(body=self._completion(prepared, result), headers={VERSION_HEADER: prepared.served_by})

    def models(self) -> Reply:
        """``GET /v1/models``: the base model, then every region in the registry with its servable versions."""
        base = self.runtime.name
        data = [{"id": base, "object": "model", "created": self.created, "owned_by": "culign", "region": None}]
        for region, versions in self.adapters.available().items():
            if versions:
                data.append({"id": region, "object": "model", "created": self.created, "owned_by": "culign",
                             "root": base, "parent": base, "region": region, "latest_version": versions[-1],
                             "versions": versions})
        return Reply(body={"object": "list", "data": data})

    @staticmethod
    def error(e: ServingError) -> Reply:
        return Reply(status=e.status, body=e.body())

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ validation
    def select(self, region_header: Sequence[str], model: str | None = None) -> Adapter | None:
        """The adapter a request names by header and/or OpenAI ``model``; None = the base model."""
        values = [v for v in region_header if v.strip()]
        if len(values) > 1:
            raise ServingError(400, f"give one {REGION_HEADER} header, not {len(values)}", param=REGION_HEADER)
        from_header = self.adapters.lookup(parse_region(values[0].strip())) if values else None
        from_model = self._model_region(model)
        if from_header and from_model and from_header.ref != from_model.ref:
            raise ServingError(400, f"{REGION_HEADER} selects {from_header.ref} but model {_show(model)} selects "
                                    f"{from_model.ref}; give one, or make them agree", param="model")
        return from_header or from_model

    def _model_region(self, model: str | None) -> Adapter | None:
        """``model``: the base model's name (no region), ``"US"``, ``"US@2"`` or ``"<base>:US"``."""
        if not model or model in self.base_names:
            return None
        for base in self.base_names:
            if model.startswith(base + ":"):
                model = model[len(base) + 1:]
                break
        return self.adapters.lookup(parse_region(model, source="model"), source="model")

    def prepare(self, body: ChatRequest, region_header: Sequence[str] = (), model: str | None = None) -> Prepared:
        """Check a request's values and select its adapter; ServingError (400/404/413) when they do not hold."""
        if not body.messages:
            raise ServingError(400, "messages is empty: give at least one message", param="messages")
        extra = body if isinstance(body, ChatCompletionRequest) else None
        if extra and extra.n not in (None, 1):
            raise ServingError(400, "only n=1 is supported", param="n")
        if extra and extra.stop:
            raise ServingError(400, "stop sequences are not supported", param="stop")
        temperature = 0.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0.0 <= temperature <= 2.0:
            raise ServingError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
        if not 0.0 < top_p <= 1.0:
            raise ServingError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
        if body.seed is not None and not 0 <= body.seed < 2**63:  # torch.Generator.manual_seed's range
            raise ServingError(400, f"seed must be an integer in [0, 2^63 - 1], got {body.seed}", param="seed")
        asked = body.max_tokens if body.max_tokens is not None else (extra.max_completion_tokens if extra else None)
        if asked is not None and not 1 <= asked <= self.max_tokens_cap:
            raise ServingError(400, f"max_tokens must be between 1 and {self.max_tokens_cap}, got {asked}",
                               param="max_tokens")
        adapter = self.select(region_header, model)
        ids = self._prompt_ids(body.messages)
        virtual = adapter.prompt.shape[0] if adapter else 0
        room = self.runtime.max_context - virtual - len(ids)
        if room < 1:
            raise ServingError(413, f"prompt is {len(ids)} tokens (+{virtual} virtual); the model's context is "
                                    f"{self.runtime.max_context}", param="messages")
        if asked is not None and asked > room:
            raise ServingError(400, f"max_tokens {asked} does not fit: prompt {len(ids)} + {virtual} virtual tokens "
                                    f"leave {room} of the context ({self.runtime.max_context})", param="max_tokens")
        max_new = asked if asked is not None else min(self.default_max_tokens, self.max_tokens_cap, room)
        request = GenerationRequest(ids, adapter.prompt if adapter else None, max_new, temperature, top_p, body.seed)
        return Prepared(request, adapter, len(ids))

    def _prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        turns = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                  else "".join(p.text for p in m.content if p.type == "text")} for m in messages]
        chars = sum(len(t["content"]) for t in turns)
        if chars > 16 * self.runtime.max_context:  # hopeless: refuse before spending time tokenizing it
            raise ServingError(413, f"prompt is {chars} characters; the model's context is "
                                    f"{self.runtime.max_context} tokens", param="messages")
        return self.runtime.chat_ids(turns)

    # ------------------------------------------------------------------ generation
    def new_result(self, prepared: Prepared) -> "Result":
        return Result(prepared, Detokenizer(self.runtime.tokenizer, self.runtime.stop_ids))

    async def deltas(self, prepared: Prepared, result: "Result") -> AsyncIterator[str]:
        """Queue the request with the decode worker; yield text deltas as its tokens arrive (into ``result``)."""
        job = self.worker.submit(prepared.request, prepared.served_by)
        try:
            async for token in job.tokens():
                delta = result.add(token)
                if delta:
                    yield delta
            tail = result.detok.flush()
            if tail:
                yield tail
        finally:
            job.cancelled = True  # a client that hung up stops costing detokenizing; its row ends with its batch

    async def generate(self, prepared: Prepared) -> "Result":
        result = self.new_result(prepared)
        async for _ in self.deltas(prepared, result):
            pass
        return result

    # ------------------------------------------------------------------ OpenAI shapes
    def _model_label(self, prepared: Prepared) -> str:
        return prepared.adapter.ref if prepared.adapter else self.runtime.name

    def _completion(self, prepared: Prepared, result: "Result") -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self._model_label(prepared), "region": prepared.region,
                "adapter_version": prepared.version,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": result.usage()}

    async def _sse(self, prepared: Prepared, include_usage: bool) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self._model_label(prepared), "region": prepared.region,
                "adapter_version": prepared.version}

        def chunk(delta: dict, finish: str | None = None, **more: Any) -> str:
            choices = [] if more.get("usage") else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        result = self.new_result(prepared)
        try:
            async for delta in self.deltas(prepared, result):
                yield chunk({"content": delta})
        except ServingError as e:  # the 200 status is sent already: say it in the stream, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, result.finish_reason)
        if include_usage:
            yield chunk({}, usage=result.usage())
        yield "data: [DONE]\n\n"


class Result:
    """The tokens one request got back, with their text, finish reason and usage."""

    def __init__(self, prepared: Prepared, detok: Detokenizer):
        self.prepared, self.detok = prepared, detok
        self.token_ids: list[int] = []

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        return self.detok.push(token)

    @property
    def text(self) -> str:
        return self.detok.text()

    @property
    def finish_reason(self) -> str:
        return "stop" if self.token_ids and self.token_ids[-1] in self.detok.stop_ids else "length"

    def usage(self) -> dict:
        p, c = self.prepared.prompt_tokens, len(self.token_ids)
        virtual = self.prepared.adapter.prompt.shape[0] if self.prepared.adapter else 0
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "virtual_tokens": virtual}
