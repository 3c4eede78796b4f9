"""The chat service behind ``service.py``: a validated request, its soft prompt, generation through the inference
engine, stop strings, logprobs and the reply bodies (``/chat`` and OpenAI-shaped, streamed or not).

Knows nothing of BentoML or any HTTP framework: a handler gives :class:`ChatService` the parsed body and the region
header and gets back a :class:`Reply` (status, JSON body or a stream of SSE lines, headers). The pieces it drives
have their own modules: the request models and checks (:mod:`.requests`), the region router (:mod:`.router`, over
the adapter cache), and the inference engine behind its seam (:mod:`.engines`, culign's scheduler or vLLM, built by
``build_engine``). Everything here is the same for both engines.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import torch

from ..model.decoding import GenerationRequest, Token
from ..model.runtime import Runtime
from ..registry import AdapterRegistry
from .adapter_cache import Adapter, AdapterCache
from .admission import KeyShareExceeded, KeyShares
from .engines import Engine, QueueFull, RowFailed, ShuttingDown, build_engine
from .requests import ChatCompletionRequest, ChatRequest, Message, ServingError, check_values
from .router import REGION_HEADER, Allow, RegionRouter
from .settings import ServiceSettings

__all__ = ["ChatService", "Detokenizer", "Prepared", "Reply", "Result", "REGION_HEADER", "VERSION_HEADER"]

log = logging.getLogger("culign.serving")

VERSION_HEADER = "X-Culign-Adapter"  # response header: which adapter served the request ("US@2" or "none")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""
    request: GenerationRequest
    adapter: Adapter | None
    prompt_tokens: int
    stop: tuple[str, ...] = ()
    client: str | None = None  # the API key's id (None without keys): whose share of the engine it takes

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


# ---------------------------------------------------------------------------------------------------- service
Disconnected = Callable[[], Awaitable[bool]]


class ChatService:
    """Everything the HTTP handlers need: validation, region selection, generation, reply bodies."""

    def __init__(self, runtime: Runtime, registry: AdapterRegistry, settings: ServiceSettings | None = None, *,
                 engine: Engine | None = None):
        self.runtime = runtime
        self.settings = s = settings or ServiceSettings(adapters=registry.root)
        self.adapters = AdapterCache(registry, runtime, s.rescan_seconds,
                                     prompt_dtype=torch.float32 if s.engine == "vllm" else None)
        self.router = RegionRouter(self.adapters, runtime.name)
        self.engine: Engine = engine if engine is not None else build_engine(s, runtime)
        self.shares = KeyShares(self.engine.max_rows + self.engine.max_queue, s.key_share)
        self.invariance = self.engine.invariance()
        inner = getattr(self.engine, "engine", self.engine)  # a Supervisor names the engine it watches
        log.info("decoding with %s%s (%d rows, %d waiting at most); batch-invariant: %s (%s)", type(inner).__name__,
                 ", restarted if it dies" if inner is not self.engine else "", self.engine.max_rows,
                 self.engine.max_queue,
                 "yes" if self.invariance.batch_invariant else "NO", self.invariance.why)
        self.created = int(time.time())

    # ------------------------------------------------------------------ endpoints
    async def chat(self, body: ChatRequest, region_header: Sequence[str],
                   disconnected: Disconnected | None = None, allow: Allow | None = None,
                   client: str | None = None) -> Reply:
        """``POST /chat`` -> ``{region, adapter_version, message, usage, finish_reason}``. ``allow`` and ``client``
        come from the caller's API key (its grant, its id for the per-key share), None without keys."""
        try:
            prepared = await self.prepare(body, region_header, allow=allow, client=client)
            result = await self.generate(prepared, disconnected)
        except ServingError as e:
            return self.error(e)
        return Reply(body={"region": prepared.region, "adapter_version": prepared.version,
                           "message": {"role": "assistant", "content": result.text},
                           "finish_reason": result.finish_reason, "usage": result.usage()},
                     headers={VERSION_HEADER: prepared.served_by})

    async def chat_completions(self, body: ChatCompletionRequest, region_header: Sequence[str],
                               disconnected: Disconnected | None = None, allow: Allow | None = None,
                               client: str | None = None) -> Reply:
        """``POST /v1/chat/completions``, OpenAI-compatible; ``stream: true`` gives SSE chunks and ``[DONE]``."""
        try:
            prepared = await self.prepare(body, region_header, model=body.model, allow=allow, client=client)
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
        serving = {"engine": self.engine.name, "batch_invariant": self.invariance.batch_invariant}
        # the router may rescan the registry: off the loop
        data = await asyncio.to_thread(self.router.models, allow, self.created, serving)
        return Reply(body={"object": "list", "data": data,
                           "engine": {"name": self.engine.name, **self.invariance.as_dict()}})

    @staticmethod
    def error(e: ServingError) -> Reply:
        return Reply(status=e.status, body=e.body(), headers=e.headers)

    def close(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------------ validation
    async def prepare(self, body: ChatRequest, region_header: Sequence[str] = (), model: str | None = None,
                      allow: Allow | None = None, client: str | None = None) -> Prepared:
        """Check a request and select its adapter; ServingError (400/404/413/503) when it does not hold."""
        check_values(body)
        extra = body if isinstance(body, ChatCompletionRequest) else None
        asked = body.max_tokens if body.max_tokens is not None else (extra.max_completion_tokens if extra else None)
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        cap = self.settings.max_tokens
        if asked is not None and not 1 <= asked <= cap:
            raise ServingError(400, f"{param} must be between 1 and {cap}, got {asked}", param=param)
        # the registry may be rescanned and an adapter's sha256 checked: never on the event loop
        adapter = await asyncio.to_thread(self.router.select, region_header, model, allow)
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
        return Prepared(request, adapter, len(ids), stops, client)

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
        client = prepared.client
        if client is not None:
            try:
                self.shares.take(client, self.engine.stats)
            except KeyShareExceeded as e:
                raise ServingError(429, str(e), kind="rate_limit_error",
                                   headers={"Retry-After": str(e.retry_after)}) from None
        try:
            job = self._submit_to_engine(prepared)
        except BaseException:
            if client is not None:
                self.shares.give_back(client)
            raise
        if client is not None:
            job.when_finished(lambda: self.shares.give_back(client))
        return job

    def _submit_to_engine(self, prepared: Prepared):
        try:
            return self.engine.submit(prepared.request, prepared.served_by, prepared.region)
        except QueueFull as e:
            raise ServingError(429, f"the server is busy ({e.queued} requests waiting); retry after "
                                    f"{e.retry_after} s", kind="rate_limit_error",
                               headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:  # closing, or the engine died and is restarting (then: when to retry)
            retry = getattr(e, "retry_after", None)
            raise ServingError(503, str(e), kind="server_error",
                               headers={"Retry-After": str(retry)} if retry else None) from None

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
        except ServingError as e:  # the 200 status is sent already: say it in the stream, as OpenAI does, and end
            # there: [DONE] would tell a client that the answer is complete
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        finally:
            job.cancel()  # the client went away mid-stream: the row leaves at the next step
        yield chunk({}, result.finish_reason, result.logprobs(result.tokens[sent_tokens:]))
        if include_usage:
            yield chunk({}, usage=result.usage())
        yield "data: [DONE]\n\n"
