"""The chat engine behind ``service.py``: request models and their checks, region selection, generation through
the scheduler, stop strings, logprobs and the reply bodies (``/chat`` and OpenAI-shaped).

Knows nothing of BentoML or any HTTP framework: a handler gives :class:`ChatEngine` the parsed body and the region
header and gets back a :class:`Reply` (status, JSON body or a stream of SSE lines, headers). The pieces it drives
have their own modules: the inference engine behind :mod:`culign.engine`'s seam (culign's :mod:`culign.scheduler`
or :mod:`culign.vllm_engine`, picked by CULIGN_ENGINE), :mod:`culign.adapter_cache` (verified soft prompts),
:mod:`culign.regions` (``REGION@VERSION``) and :mod:`culign.settings` (the knobs). Everything here is the same for
both engines.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .adapter_cache import Adapter, AdapterCache, AdapterNotFound, AdapterRefused
from .engine import Engine, QueueFull, RowFailed, ShuttingDown, Token
from .regions import BadRegionSpec, parse_region, show
from .registry import Registry
from .runtime import GenerationRequest, Runtime
from .scheduler import Scheduler, StaticBatcher
from .settings import ServiceSettings

log = logging.getLogger("culign.serving")

REGION_HEADER = "X-Culign-Region"
VERSION_HEADER = "X-Culign-Adapter"  # response header: which adapter served the request ("US@2" or "none")
MAX_STOP = 4  # stop sequences per request (the OpenAI API's limit)
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit


def load_runtime(**kwargs: Any) -> Runtime:
    """``Runtime.load`` for serving: this (the loading) thread then computes on one thread, the decode worker on all.

    torch's OpenMP (libgomp) throttles its spin-waiting once more OpenMP threads exist than cores. A loading thread
    that kept a team of its own would push the decode worker's team over that line, and a decode step is thousands
    of tiny parallel regions: on 2 cores every token took 1.5x as long in the worker thread as in the main one
    (measured). Loading single-threaded leaves the worker's team the only one.
    """
    torch.set_num_threads(1)
    return Runtime.load(**kwargs)


def load_engine(settings: ServiceSettings) -> tuple[Runtime, Engine | None]:
    """The runtime (tokenizer, embedding table, fingerprint) and, for CULIGN_ENGINE=vllm, the vLLM engine; for
    culign's own engine None (ChatEngine builds the scheduler on the runtime)."""
    if settings.engine != "vllm":
        return load_runtime(model=settings.model, device=settings.device, dtype=settings.dtype,
                            batch_invariant=settings.batch_invariant), None
    from .runtime import default_device, model_source
    from .vllm_engine import VllmEngine, vllm_dtype

    # culign's copy of the model stays on the CPU in float32: it turns token ids into embeddings for vLLM and
    # fingerprints the weights that adapters are checked against; vLLM holds the one that decodes
    runtime = load_runtime(model=settings.model, device="cpu", dtype="float32")
    device = settings.device or default_device()
    engine = VllmEngine(runtime, model_source(settings.model)[0], max_rows=settings.max_rows,
                        max_queue=settings.max_queue, grace=settings.shutdown_grace_s,
                        dtype=vllm_dtype(settings.dtype, device), enforce_eager=settings.vllm_eager,
                        kv_cache_gib=settings.vllm_kv_gib, device=device,
                        tensor_parallel_size=settings.vllm_tensor_parallel)
    return runtime, engine


# ---------------------------------------------------------------------------------------------------- errors
class ServingError(Exception):
    """A request the service refuses, with the HTTP status and an OpenAI-shaped JSON body naming the parameter."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers, self.extra = headers or {}, extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status,
                          **self.extra}}


Allow = Callable[[str | None], bool]  # may this caller use that region (None: the base model)? From its API key


def _unavailable(e: AdapterNotFound | AdapterRefused) -> ServingError:
    if isinstance(e, AdapterRefused):  # ours to fix, not the client's: 503, with the reason
        return ServingError(503, str(e), kind="adapter_refused", param=e.source, available=e.available)
    return ServingError(404, str(e), kind="not_found_error", param=e.source, available=e.available)


# ---------------------------------------------------------------------------------------------------- requests
Number = StrictFloat | StrictInt  # strict: `true` is not a number and "1" is not a token count


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image / audio parts carry their own fields: refused by type below
    type: StrictStr = "text"
    text: StrictStr = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None  # accepted; the chat template has no place for it


class ChatRequest(BaseModel):
    """``POST /chat``. Unknown fields are refused (400 naming them), values are checked by ChatEngine.prepare."""
    model_config = ConfigDict(extra="forbid")
    messages: list[Message]
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


# OpenAI fields the service does not implement: named in the schema so that a client setting one gets a 400 that
# says so, rather than a reply that silently ignored it
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "logit_bias", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort")


class ChatCompletionRequest(ChatRequest):
    """``POST /v1/chat/completions``: the OpenAI fields culign honours, and those it refuses by name."""
    model: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    frequency_penalty: Number | None = None  # only 0 (the default) is implemented
    presence_penalty: Number | None = None
    user: StrictStr | None = None  # an end-user id: accepted, not used
    store: StrictBool | None = None  # only false: nothing is stored
    metadata: dict[str, StrictStr] | None = None  # accepted with store false, not used
    service_tier: StrictStr | None = None  # accepted ("auto" / "default"), there is one tier
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None


@dataclass
class Prepared:
    """A validated request, ready for the scheduler."""
    request: GenerationRequest
    adapter: Adapter | None
    prompt_tokens: int
    stop: tuple[str, ...] = ()

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


# ---------------------------------------------------------------------------------------------------- text
class Detokenizer:
    """Token ids -> text deltas: holds back the bytes of a character not complete yet, and the tail that may be the
    start of a stop string; a matched stop string ends the text before it (it is not returned)."""

    def __init__(self, tokenizer, stop_ids: set[int], stop: Sequence[str] = ()):
        self.tokenizer, self.stop_ids, self.stop = tokenizer, stop_ids, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""  # text handed out so far
        self.stopped = False  # a stop string matched
        self._final: str | None = None

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def text(self) -> str:
        return self._final if self._final is not None else self._decoded()

    def push(self, token: int) -> str:
        if token in self.stop_ids or self.stopped:
            return ""
        self.ids.append(token)
        text = self._decoded()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # a multi-byte character in progress: wait for its next token
        if self.stop:
            cut = min((i for i in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0),
                      default=-1)
            if cut >= 0:  # across token boundaries: searched in the whole text from just before the new part
                self.stopped, self._final = True, text[:cut]
                delta, self.sent = text[len(self.sent):cut], text[:cut]
                return delta
            # hold back the longest tail that is a prefix of some stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = text[:len(text) - hold]
            if len(safe) <= len(self.sent):
                return ""
            delta, self.sent = safe[len(self.sent):], safe
            return delta
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.text()
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


class Result:
    """The tokens one request got back, with their text, finish reason, usage and (when asked) logprobs."""

    def __init__(self, prepared: Prepared, detok: Detokenizer):
        self.prepared, self.detok = prepared, detok
        self.tokens: list[Token] = []
        self.error: ServingError | None = None

    def add(self, token: Token) -> str:
        self.tokens.append(token)
        return self.detok.push(token.id)

    @property
    def text(self) -> str:
        return self.detok.text()

    @property
    def finish_reason(self) -> str:
        if self.detok.stopped or (self.tokens and self.tokens[-1].id in self.detok.stop_ids):
            return "stop"
        return "length"

    def usage(self) -> dict:
        p, c = self.prepared.prompt_tokens, len(self.tokens)
        virtual = self.prepared.adapter.prompt.shape[0] if self.prepared.adapter else 0
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "virtual_tokens": virtual}

    def _piece(self, token_id: int, logprob: float) -> dict:
        text = self.detok.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, tokens: Sequence[Token] | None = None) -> dict | None:
        """OpenAI's ``{"content": [...]}`` for ``tokens`` (default all), stop tokens left out; None if not asked."""
        if self.prepared.request.top_logprobs is None:
            return None
        out = []
        for t in self.tokens if tokens is None else tokens:
            if t.id in self.detok.stop_ids:
                continue
            out.append({**self._piece(t.id, t.logprob), "top_logprobs": [self._piece(i, lp) for i, lp in t.top]})
        return {"content": out, "refusal": None}


# ---------------------------------------------------------------------------------------------------- engine
Disconnected = Callable[[], Awaitable[bool]]


class ChatEngine:
    """Everything the HTTP handlers need: validation, region selection, generation, reply bodies."""

    def __init__(self, runtime: Runtime, registry: Registry, settings: ServiceSettings | None = None, *,
                 worker: Engine | None = None):
        self.runtime = runtime
        self.settings = s = settings or ServiceSettings(adapters=registry.root)
        self.adapters = AdapterCache(registry, runtime, s.rescan_seconds)
        if worker is None:
            if s.scheduler == "continuous" and runtime.decodes_incrementally():
                worker = Scheduler(runtime, s.max_rows, s.max_queue, grace=s.shutdown_grace_s)
            else:
                worker = StaticBatcher(runtime, s.max_rows, s.max_queue, grace=s.shutdown_grace_s,
                                       window=s.batch_window_ms / 1000)
        self.worker: Engine = worker
        self.invariance = worker.invariance()
        log.info("decoding with %s (%d rows, %d waiting at most); batch-invariant: %s (%s)", type(worker).__name__,
                 worker.max_rows, worker.max_queue, "yes" if self.invariance.batch_invariant else "NO",
                 self.invariance.why)
        self.created = int(time.time())
        base = runtime.name
        self.base_names = {base, base.split(":", 1)[-1], base.rstrip("/").rsplit("/", 1)[-1]}

    # ------------------------------------------------------------------ endpoints
    async def chat(self, body: ChatRequest, region_header: Sequence[str],
                   disconnected: Disconnected | None = None, allow: Allow | None = None) -> Reply:
        """``POST /chat`` -> ``{region, adapter_version, message, usage, finish_reason}``."""
        try:
            prepared = await self.prepare(body, region_header, allow=allow)
            result = await self.generate(prepared, disconnected)
        except ServingError as e:
            return self.error(e)
        return Reply(body={"region": prepared.region, "adapter_version": prepared.version,
                           "message": {"role": "assistant", "content": result.text},
                           "finish_reason": result.finish_reason, "usage": result.usage()},
                     headers={VERSION_HEADER: prepared.served_by})

    async def chat_completions(self, body: ChatCompletionRequest, region_header: Sequence[str],
                               disconnected: Disconnected | None = None, allow: Allow | None = None) -> Reply:
        """``POST /v1/chat/completions``, OpenAI-compatible; ``stream: true`` gives SSE chunks and ``[DONE]``."""
        try:
            prepared = await self.prepare(body, region_header, model=body.model, allow=allow)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                job = self._submit(prepared)  # a full queue is a 429 now, not an error inside a 200 stream
                return Reply(stream=self._sse(prepared, job, include_usage, disconnected),
                             headers={VERSION_HEADER: prepared.served_by})
            result = await self.generate(prepared, disconnected)
        except ServingError as e:
            return self.error(e)
        return Reply(body=self._completion(prepared, result), headers={VERSION_HEADER: prepared.served_by})

    async def models(self, allow: Allow | None = None) -> Reply:
        """``GET /v1/models``: the base model, then every region in the registry with its servable versions (those
        the caller's API key may use), each saying which engine serves it and whether its greedy answers are the
        same alone and in a batch."""
        base = self.runtime.name
        available = await asyncio.to_thread(self.adapters.available)  # may rescan the registry: off the loop
        serving = {"engine": self.worker.name, "batch_invariant": self.invariance.batch_invariant}
        data = []
        if allow is None or allow(None):
            data.append({"id": base, "object": "model", "created": self.created, "owned_by": "culign",
                         "region": None, **serving})
        for region, versions in available.items():
            if versions and (allow is None or allow(region)):
                data.append({"id": region, "object": "model", "created": self.created, "owned_by": "culign",
                             "root": base, "parent": base, "region": region, "latest_version": versions[-1],
                             "versions": versions, "forced_invalid_versions": self.adapters.forced_invalid(region),
                             **serving})
        return Reply(body={"object": "list", "data": data,
                           "engine": {"name": self.worker.name, **self.invariance.as_dict()}})

    @staticmethod
    def error(e: ServingError) -> Reply:
        return Reply(status=e.status, body=e.body(), headers=e.headers)

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ validation
    def _select(self, region_header: Sequence[str], model: str | None = None,
                allow: Allow | None = None) -> Adapter | None:
        """The adapter a request names by header and/or OpenAI ``model``; None = the base model. Blocking.
        A region the caller's key may not use is a 403, whether or not the registry has it."""
        values = [v for v in region_header if v.strip()]
        if len(values) > 1:
            raise ServingError(400, f"give one {REGION_HEADER} header, not {len(values)}", param=REGION_HEADER)
        if allow is not None:
            self._check_allowed(values[0].strip() if values else None, model, allow)
        try:
            from_header = self.adapters.lookup(parse_region(values[0].strip(), REGION_HEADER), REGION_HEADER) \
                if values else None
            from_model = self._model_region(model)
        except BadRegionSpec as e:
            raise ServingError(400, str(e), param=e.source) from None
        except (AdapterNotFound, AdapterRefused) as e:
            raise _unavailable(e) from None
        if from_header and from_model and from_header.ref != from_model.ref:
            raise ServingError(400, f"{REGION_HEADER} selects {from_header.ref} but model {show(model)} selects "
                                    f"{from_model.ref}; give one, or make them agree", param="model")
        return from_header or from_model

    def _check_allowed(self, header: str | None, model: str | None, allow: Allow) -> None:
        """403 for a region (or the base model) outside the key's grant. Checked on the names as given (aliases
        resolved like the registry does, never touching it), so a key learns nothing of regions it may not use."""
        from . import targets

        asked: list[tuple[str | None, str]] = []
        if header is not None:
            asked.append((header, REGION_HEADER))
        if model and model not in self.base_names:
            name = model
            for base in self.base_names:
                if model.startswith(base + ":"):
                    name = model[len(base) + 1:]
            asked.append((name, "model"))
        if not asked:  # the bare model: named by model (its base name), or by giving no region at all
            asked.append((None, "model" if model is not None else REGION_HEADER))
        for value, source in asked:
            if value is None:
                if not allow(None):
                    raise ServingError(403, "this API key may not use the base model: name a region it may use",
                                       kind="permission_error", param=source)
                continue
            try:
                spec = parse_region(value, source)
            except BadRegionSpec as e:
                raise ServingError(400, str(e), param=e.source) from None
            names = {spec.name.upper()}
            try:
                names.add(targets.resolve(spec.name).key.upper())  # "China" -> "CN"
            except ValueError:
                pass
            if not any(allow(n) for n in names):
                raise ServingError(403, f"this API key may not use region {show(spec.name)} (in {source})",
                                   kind="permission_error", param=source)

    def _model_region(self, model: str | None) -> Adapter | None:
        """``model``: the base model's name (no region), ``"US"``, ``"US@2"`` or ``"<base>:US"``."""
        if not model or model in self.base_names:
            return None
        for base in self.base_names:
            if model.startswith(base + ":"):
                model = model[len(base) + 1:]
                break
        return self.adapters.lookup(parse_region(model, "model"), "model")

    @staticmethod
    def check_values(body: ChatRequest) -> None:
        """Every value against the range the OpenAI API defines, and every field culign does not implement, as a
        400 naming the parameter."""
        if not body.messages:
            raise ServingError(400, "messages is empty: give at least one message", param="messages")
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise ServingError(400, f"content parts of type {show(part.type)} are not supported "
                                                "(text only)", param=f"messages[{i}].content[{j}].type")
        if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:
            raise ServingError(400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature")
        if body.top_p is not None and not 0.0 <= body.top_p <= 1.0:
            raise ServingError(400, f"top_p must be in [0, 1], got {body.top_p}", param="top_p")
        if body.seed is not None and not -2**63 <= body.seed < 2**64:  # torch.Generator.manual_seed's range
            raise ServingError(400, f"seed must be an integer in [-2^63, 2^64 - 1], got {body.seed}", param="seed")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP:
            raise ServingError(400, f"stop takes at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
        if any(not s or len(s) > 256 for s in stops):
            raise ServingError(400, "each stop sequence must be 1 to 256 characters", param="stop")
        if not isinstance(body, ChatCompletionRequest):
            return
        for name in UNSUPPORTED:
            if getattr(body, name) is not None:
                raise ServingError(400, f"{name} is not supported by this server", param=name)
        if body.n is not None and body.n != 1:
            raise ServingError(400, f"only n=1 is supported, got {body.n}", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(body, name)
            if value is not None and not -2.0 <= value <= 2.0:
                raise ServingError(400, f"{name} must be in [-2, 2], got {value}", param=name)
            if value:
                raise ServingError(400, f"{name} is not supported by this server (only 0)", param=name)
        if body.store:
            raise ServingError(400, "store is not supported: nothing is stored", param="store")
        if body.top_logprobs is not None:
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ServingError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                                   param="top_logprobs")
            if not body.logprobs:
                raise ServingError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.stream_options is not None and not body.stream:
            raise ServingError(400, "stream_options needs stream: true", param="stream_options")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ServingError(400, "max_tokens and max_completion_tokens disagree: give one", param="max_tokens")

    async def prepare(self, body: ChatRequest, region_header: Sequence[str] = (), model: str | None = None,
                      allow: Allow | None = None) -> Prepared:
        """Check a request and select its adapter; ServingError (400/404/413/503) when it does not hold."""
        self.check_values(body)
        extra = body if isinstance(body, ChatCompletionRequest) else None
        asked = body.max_tokens if body.max_tokens is not None else (extra.max_completion_tokens if extra else None)
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        cap = self.settings.max_tokens
        if asked is not None and not 1 <= asked <= cap:
            raise ServingError(400, f"{param} must be between 1 and {cap}, got {asked}", param=param)
        # the registry may be rescanned and an adapter's sha256 checked: never on the event loop
        adapter = await asyncio.to_thread(self._select, region_header, model, allow)
        ids = self._prompt_ids(body.messages)
        virtual = adapter.prompt.shape[0] if adapter else 0
        room = self.runtime.max_context - virtual - len(ids)
        if room < 1:
            raise ServingError(413, f"prompt is {len(ids)} tokens (+{virtual} virtual); the model's context is "
                                    f"{self.runtime.max_context}", param="messages")
        if asked is not None and asked > room:
            raise ServingError(400, f"{param} {asked} does not fit: prompt {len(ids)} + {virtual} virtual tokens "
                                    f"leave {room} of the context ({self.runtime.max_context})", param=param)
        max_new = asked if asked is not None else min(self.settings.default_max_tokens, cap, room)
        temperature = 0.0 if body.temperature is None else float(body.temperature)
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        top_logprobs = (extra.top_logprobs or 0) if extra and extra.logprobs else None
        request = GenerationRequest(ids, adapter.prompt if adapter else None, max_new, temperature, top_p, body.seed,
                                    top_logprobs)
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return Prepared(request, adapter, len(ids), stops)

    def _prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        turns = [{"role": "system" if m.role == "developer" else m.role,
                  "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                 for m in messages]
        chars = sum(len(t["content"]) for t in turns)
        if chars > 16 * self.runtime.max_context:  # hopeless: refuse before spending time tokenizing it
            raise ServingError(413, f"prompt is {chars} characters; the model's context is "
                                    f"{self.runtime.max_context} tokens", param="messages")
        return self.runtime.chat_ids(turns)

    # ------------------------------------------------------------------ generation
    def _submit(self, prepared: Prepared):
        try:
            return self.worker.submit(prepared.request, prepared.served_by, prepared.region)
        except QueueFull as e:
            raise ServingError(429, f"the server is busy ({e.queued} requests waiting); retry after "
                                    f"{e.retry_after} s", kind="rate_limit_error",
                               headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ServingError(503, str(e), kind="server_error") from None

    def new_result(self, prepared: Prepared) -> Result:
        return Result(prepared, Detokenizer(self.runtime.tokenizer, self.runtime.stop_ids, prepared.stop))

    async def deltas(self, prepared: Prepared, result: Result, job=None) -> AsyncIterator[str]:
        """Text deltas as the request's tokens arrive (into ``result``). When the caller stops listening (client
        gone) or a stop string matches, the row is cancelled and leaves the batch at the next step."""
        job = job or self._submit(prepared)
        try:
            try:
                async for token in job.tokens():
                    delta = result.add(token)
                    if delta:
                        yield delta
                    if result.detok.stopped:
                        break
            except (RowFailed, ShuttingDown) as e:
                raise ServingError(503, str(e), kind="server_error") from None
            tail = result.detok.flush()
            if tail:
                yield tail
        finally:
            job.cancel()  # no-op for a finished row

    async def generate(self, prepared: Prepared, disconnected: Disconnected | None = None) -> Result:
        """The whole answer. With ``disconnected`` (polled every 0.25 s) a client that hung up cancels the row."""
        result = self.new_result(prepared)
        job = self._submit(prepared)

        async def consume() -> Result:
            async for _ in self.deltas(prepared, result, job):
                pass
            return result

        task = asyncio.ensure_future(consume())
        try:
            while disconnected is not None and not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await disconnected():
                    job.cancel()
                    task.cancel()
                    raise ServingError(499, "client closed the request", kind="client_closed")
            return await task
        finally:
            if not task.done():
                task.cancel()

    # ------------------------------------------------------------------ OpenAI shapes
    def _model_label(self, prepared: Prepared) -> str:
        return prepared.adapter.ref if prepared.adapter else self.runtime.name

    def _completion(self, prepared: Prepared, result: Result) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self._model_label(prepared), "region": prepared.region,
                "adapter_version": prepared.version, "system_fingerprint": self.runtime.fingerprint,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                             "finish_reason": result.finish_reason, "logprobs": result.logprobs()}],
                "usage": result.usage()}

    async def _sse(self, prepared: Prepared, job, include_usage: bool,
                   disconnected: Disconnected | None = None) -> AsyncIterator[str]:
        """The SSE lines of a streamed answer. The server may not tell a generator that its client hung up (sends
        to a closed connection can be dropped silently), so ``disconnected`` is polled every 0.25 s of tokens."""
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self._model_label(prepared), "region": prepared.region,
                "adapter_version": prepared.version, "system_fingerprint": self.runtime.fingerprint}

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None, **more: Any) -> str:
            choices = [] if more.get("usage") else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": logprobs}]
            return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

        result = self.new_result(prepared)
        sent_tokens, checked = 0, time.monotonic()
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in self.deltas(prepared, result, job):
                logprobs = result.logprobs(result.tokens[sent_tokens:])
                sent_tokens = len(result.tokens)
                yield chunk({"content": delta}, logprobs=logprobs)
                if disconnected is not None and time.monotonic() - checked >= 0.25:
                    checked = time.monotonic()
                    if await disconnected():
                        return  # finally: the row leaves at the next step
        except ServingError as e:  # the 200 status is sent already: say it in the stream, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            job.cancel()  # the client went away mid-stream: the row leaves at the next step
        yield chunk({}, result.finish_reason, result.logprobs(result.tokens[sent_tokens:]))
        if include_usage:
            yield chunk({}, usage=result.usage())
        yield "data: [DONE]\n\n"
