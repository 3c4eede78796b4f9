"""culign's BentoML service: one frozen model, many regions (soft prompts) picked per request.

    bentoml serve service:Culign            # then: curl -H 'X-Culign-Region: US' localhost:3000/chat -d '{...}'

HTTP in, chat service call, HTTP out. The logic lives in culign/serving/: the chat service (chat.py), the region
router (router.py) over the adapter cache, the inference engine behind its seam (engines/: culign's scheduler, or
vLLM with CULIGN_ENGINE=vllm), API keys (auth.py); the settings are read once from the environment (settings.py,
listed in docs/deploy.md). What is HTTP stays here: size limits, content types, error shapes, the Authorization
header, client disconnects, /metrics.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import bentoml
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from culign import http_limits
from culign.model.hardware import cpu_capability
from culign.registry import open_registry
from culign.serving import (REGION_HEADER, VERSION_HEADER, ChatCompletionRequest, ChatRequest, ChatService, Reply,
                            ServiceSettings, load_runtime)
from culign.serving.engines import supervised_engine
from culign.serving.auth import AuthError, Grant, KeyRing

log = logging.getLogger("culign.service")
API_PATHS = ("/chat", "/v1/chat/completions")
OPEN_PATHS = ("/livez", "/readyz", "/metrics")  # probes and scrapers carry no key
SETTINGS = ServiceSettings.from_env(default_adapters=Path(__file__).resolve().parent / "adapters")
API_KEYS = KeyRing(SETTINGS.api_keys, SETTINGS.api_keys_poll_s) if SETTINGS.api_keys else None  # a bad file: no start
http_limits.install(SETTINGS.max_header_bytes, SETTINGS.max_header_block_bytes)  # before uvicorn loads its protocol


class _QuietBadBodies(logging.Filter):
    """BentoML logs a body that fails validation as an ERROR with a traceback; the client got a 400 and the access
    log has the line, so that is not a server error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], (ValidationError, json.JSONDecodeError,
                                                                         UnicodeDecodeError)))


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietBadBodies())
logging.getLogger("bentoml.access").addFilter(_QuietBadBodies())
logging.getLogger("_bentoml_impl.server.app").addFilter(_QuietBadBodies())


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _param(loc) -> str:
    """pydantic's error location -> ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _openai_error(body: bytes) -> bytes | None:
    """BentoML's 400 for a body that failed the pydantic model -> OpenAI's error shape, naming the parameter."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return None
    first = detail[0]
    loc = [p for p in first.get("loc", []) if p not in ("body",)]
    # a union (str | list) reports one error per member: the field is what matters
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "list", "int", "float", "bool")))]
    param = _param(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unrecognized request argument"
    message = f"{param}: {msg}" + (f" (and {len(detail) - 1} more)" if len(detail) > 1 else "")
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": 400}}).encode()


class HttpGuard:
    """ASGI middleware in front of the API: size caps, content type, trailing slashes, error shapes.

    - a body over ``max_body`` bytes -> 413 (read no further); a header value over ``max_header`` or all headers
      over ``max_block`` -> 431 naming the largest header (past ``max_block`` the parser answers it first);
    - POST to the API with a Content-Type that is not JSON -> 415 (BentoML would log a traceback for it);
    - ``/chat/`` is ``/chat`` (no 307 redirect that a client would follow with a GET);
    - BentoML's 400 for a body failing the request model is rewritten in OpenAI's shape with ``param``.
    """

    def __init__(self, app, max_body: int, max_header: int, max_block: int):
        self.app, self.max_body, self.max_header, self.max_block = app, max_body, max_header, max_block

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/"), "raw_path": path.rstrip("/").encode()}
            path = scope["path"]
        raw = scope.get("headers", [])
        if any(len(v) > self.max_header for _, v in raw) or sum(len(k) + len(v) for k, v in raw) > self.max_block:
            # the same body as the parser's past its hard cap (culign/http_limits.py): one answer, however split
            body = http_limits.too_large_body(http_limits.largest_header(raw), self.max_header, self.max_block)
            return await Response(body, 431, media_type="application/json")(scope, receive, send)
        if path not in API_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, self._json_refusals(scope, send))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            return await _error(415, f"Content-Type must be application/json, got {ctype[:60]!r}",
                                "Content-Type")(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _error(413, f"body is {declared} bytes (at most {self.max_body})", "body")(scope, receive,
                                                                                                    send)
        chunks, size = [], 0
        while True:  # read the body here, so that an endless one stops at the cap
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _error(413, f"body is over {self.max_body} bytes", "body")(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if not body.strip():
            return await _error(400, "the request body is empty: send a JSON object", "body")(scope, receive, send)
        try:
            json.loads(body)
        except RecursionError:
            return await _error(400, "the request body nests too deeply", "body")(scope, receive, send)
        except (ValueError, UnicodeDecodeError) as e:
            return await _error(400, f"the request body is not valid JSON: {str(e)[:120]}", "body")(scope, receive,
                                                                                                    send)
        start: dict | None = None

        async def send_reshaped(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] == 400:
                start = message  # hold it: the body decides the shape
                return
            if start is not None and message["type"] == "http.response.body":
                fixed = _openai_error(message.get("body", b"")) if not message.get("more_body") else None
                if fixed is not None:
                    hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    hdrs.append((b"content-length", str(len(fixed)).encode()))
                    await send({**start, "headers": hdrs})
                    await send({"type": "http.response.body", "body": fixed})
                else:
                    await send(start)
                    await send(message)
                start = None
                return
            await send(message)

        await self.app(scope, replay, send_reshaped)


    @staticmethod
    def _json_refusals(scope, send):
        """Starlette answers an unknown path (404) or a wrong method (405) in plain text: say it in JSON, naming
        the path or the method, like every other refusal."""
        held: dict | None = None

        async def wrapped(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                if ctype.startswith(b"text/plain"):
                    held = message
                    return
            if held is not None and message["type"] == "http.response.body":
                status = held["status"]
                if status == 404:
                    body = {"message": f"no endpoint at {scope['path'][:80]!r}", "param": "path"}
                else:
                    body = {"message": f"method {scope['method']} is not allowed on {scope['path'][:80]!r}",
                            "param": "method"}
                data = json.dumps({"error": {**body, "type": "invalid_request_error", "code": status}}).encode()
                headers = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type",
                                                                                           b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": data})
                held = None
                return
            await send(message)

        return wrapped


class ApiKeyGuard:
    """ASGI middleware: with CULIGN_API_KEYS set, every path but the probes and /metrics needs
    ``Authorization: Bearer <key>``; a missing or wrong key is a 401 in OpenAI's shape. The key's grant travels in
    the request's state for the handlers (a region outside it is a 403 there). The header is never logged."""

    def __init__(self, app, keys: KeyRing | None):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if self.keys is None or scope["type"] != "http" or scope["path"].rstrip("/") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        values = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            if len(values) > 1:
                raise AuthError("give one Authorization header")
            grant = self.keys.check(values[0].decode("latin-1") if values else None)
        except AuthError as e:
            response = JSONResponse({"error": {"message": str(e), "type": "invalid_request_error",
                                               "param": "Authorization", "code": "invalid_api_key"}},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        scope.setdefault("state", {})["culign_grant"] = grant
        return await self.app(scope, receive, send)


def _grant(request: Request) -> Grant | None:
    """The caller's key's grant, put there by ApiKeyGuard (None: no API keys configured)."""
    return request.scope.get("state", {}).get("culign_grant")


def grant_of(request: Request):
    """The caller's region check (None: no API keys configured, everything allowed)."""
    grant = _grant(request)
    return grant.allows if grant is not None else None


def client_of(request: Request) -> str | None:
    """The caller's key id, for its share of the engine (None: no API keys configured)."""
    grant = _grant(request)
    return grant.key_id if grant is not None else None


def to_response(reply: Reply, ctx: bentoml.Context | None = None) -> Response:
    if ctx is not None:
        ctx.response.status_code = reply.status  # BentoML copies the context's status onto what we return
    if reply.stream is not None:
        return StreamingResponse(reply.stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **reply.headers})
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def list_models(request: Request) -> Response:
    return to_response(await bentoml.get_current_service().chat_service.models(grant_of(request)))


# GET routes are not @bentoml.api material: a small Starlette app, mounted at /v1, serves them.
openai_app = Starlette(routes=[Route("/models", list_models, methods=["GET"])])


# culign's gauges on /metrics: name -> what it says (refreshed every second from the chat service)
GAUGES = {
    "culign_queue_depth": "requests waiting for a row",
    "culign_rows_in_flight": "rows being decoded",
    "culign_tokens_per_second": "tokens generated per second, over the last 10 s",
    "culign_rejected_total": "requests refused with 429 since start (the engine's queue full)",
    "culign_cancelled_rows_total": "rows stopped early since start (client gone, stop string matched)",
    "culign_registry_unreachable": "1 while the object-store registry cannot be reached (the last good listing is "
                                   "served)",
    "culign_registry_unreachable_scans_total": "registry rescans that could not reach the store",
    "culign_engine_restarts_total": "times the inference engine died and was restarted in-process since start",
    "culign_engine_last_recovery_seconds": "seconds from the last engine death to serving again",
    "culign_api_keys_file_refused": "1 while the API keys file on disk does not load (the last good keys stay in "
                                    "force)",
    "culign_api_keys_reloads_total": "times the API keys file was reloaded since start",
    "culign_key_share_rejected_total": "requests refused with 429 because their API key held its whole share of "
                                       "the engine's places",
}


class Metrics:
    """culign's lines on BentoML's /metrics: the gauges above, and requests answered per region and status."""

    def __init__(self, chat_service: ChatService):
        self.chat_service = chat_service
        self.gauges = {name: bentoml.metrics.Gauge(name=name, documentation=doc) for name, doc in GAUGES.items()}
        self.requests = bentoml.metrics.Counter(name="culign_requests", documentation="chat requests answered, by "
                                                "region (base: no adapter) and status", labelnames=["region", "status"])
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="culign-metrics", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.refresh()

    def refresh(self) -> None:
        service = self.chat_service
        engine, adapters, stats = service.engine, service.adapters, service.engine.stats
        values = {
            "culign_queue_depth": engine.queued, "culign_rows_in_flight": stats.rows_in_flight,
            "culign_tokens_per_second": stats.tokens_per_s(), "culign_rejected_total": stats.rejected,
            "culign_cancelled_rows_total": stats.cancelled_rows,
            "culign_registry_unreachable": int(adapters.store_unreachable),
            "culign_registry_unreachable_scans_total": adapters.store_failures,
            "culign_engine_restarts_total": engine.restarts,
            "culign_engine_last_recovery_seconds": engine.last_recovery_s,
            "culign_api_keys_file_refused": int(API_KEYS.file_refused) if API_KEYS else None,
            "culign_api_keys_reloads_total": API_KEYS.reloads if API_KEYS else None,
            "culign_key_share_rejected_total": service.shares.refused,
        }
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(value)

    def count(self, reply: Reply) -> None:
        served = reply.headers.get(VERSION_HEADER, "none")
        self.requests.labels(region="base" if served == "none" else served.split("@")[0],
                             status=str(reply.status)).inc()

    def close(self) -> None:
        self._stop.set()


def _exit_worker(reason: str) -> None:
    """The engine cannot be brought back in-process: exit non-zero (after /livez has had a moment to say 503), so
    that whatever supervises this worker (BentoML's arbiter, systemd, Kubernetes) starts a fresh one."""
    log.critical("%s: exiting the worker (status 70) for its supervisor to restart it", reason)
    threading.Timer(2.0, os._exit, args=(70,)).start()


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(name="culign", workers=1, traffic={"timeout": 600})
class Culign:
    def __init__(self) -> None:
        logging.getLogger("culign").setLevel(SETTINGS.log_level)  # BentoML's root logger says WARNING
        runtime = load_runtime(SETTINGS)
        engine = supervised_engine(SETTINGS, runtime, on_give_up=_exit_worker)
        log.info("serving %s (%s) on the %s engine in %s (%s) with adapters from %s", runtime.name,
                 runtime.fingerprint, SETTINGS.engine,
                 str(getattr(engine, "dtype", runtime.dtype)).replace("torch.", ""), cpu_capability(),
                 SETTINGS.adapters)
        if API_KEYS is None:
            log.warning("API keys: off (CULIGN_API_KEYS is not set): anyone who can reach this port may use every "
                        "region")
        else:
            log.info("API keys: on, %d keys from %s; every endpoint but %s needs Authorization: Bearer <key>; "
                     "the file is re-read when it changes (or on SIGHUP); each key may hold %g of the queue",
                     len(API_KEYS), API_KEYS.source, ", ".join(OPEN_PATHS), SETTINGS.key_share)
            API_KEYS.watch()
        self.chat_service = ChatService(runtime, open_registry(SETTINGS.adapters), SETTINGS, engine=engine)
        self.chat_service.adapters.warm()
        self.metrics = Metrics(self.chat_service)
        self._end_rows_on_signals()
        self._reload_keys_on_sighup()

    def _reload_keys_on_sighup(self) -> None:
        if API_KEYS is None:
            return
        try:
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=API_KEYS.reload, args=("SIGHUP",),
                                                                     daemon=True).start())
        except ValueError:  # not the main thread: the file watch still reloads it
            log.warning("could not hook SIGHUP: the keys file is reloaded when it changes")

    def _end_rows_on_signals(self) -> None:
        """On SIGTERM/SIGINT, close the engine (running rows get CULIGN_SHUTDOWN_GRACE_S, then end), then let
        the HTTP server's own handler run. Without this the server waits for every stream to decode to its end
        before it exits (measured: still serving 40 s after SIGTERM)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)

                def handler(signum, frame, previous=previous):
                    threading.Thread(target=self.chat_service.close, name="culign-shutdown", daemon=True).start()
                    if callable(previous):
                        previous(signum, frame)

                signal.signal(sig, handler)
            except ValueError:  # not the main thread: the server's own handling only
                log.warning("could not hook %s: running rows will finish before the server exits", sig.name)

    @bentoml.api(route="/chat")
    async def chat(self, body: ChatRequest, /, ctx: bentoml.Context) -> dict:
        """Chat with the model under the region named by the X-Culign-Region header (none: the base model)."""
        reply = await self.chat_service.chat(body, ctx.request.headers.getlist(REGION_HEADER),
                                             ctx.request.is_disconnected, grant_of(ctx.request),
                                             client_of(ctx.request))
        self.metrics.count(reply)
        return to_response(reply, ctx)

    @bentoml.api(route="/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, /, ctx: bentoml.Context) -> dict:
        """OpenAI-compatible chat; the region comes from X-Culign-Region or the `model` field."""
        reply = await self.chat_service.chat_completions(body, ctx.request.headers.getlist(REGION_HEADER),
                                                         ctx.request.is_disconnected, grant_of(ctx.request),
                                                         client_of(ctx.request))
        self.metrics.count(reply)
        return to_response(reply, ctx)

    def __is_ready__(self) -> bool:
        return self.chat_service.engine.alive()  # False while a dead engine is being restarted

    def __is_alive__(self) -> bool:
        return self.chat_service.engine.live()  # False once restarting it has failed: the worker exits then

    @bentoml.on_shutdown
    def close(self) -> None:
        self.metrics.close()
        if API_KEYS is not None:
            API_KEYS.close()
        self.chat_service.close()


# Starlette runs the first added outermost: size caps and error shapes first, then the key check
Culign.add_asgi_middleware(HttpGuard, max_body=SETTINGS.max_body_bytes, max_header=SETTINGS.max_header_bytes,
                           max_block=SETTINGS.max_header_block_bytes)
Culign.add_asgi_middleware(ApiKeyGuard, keys=API_KEYS)
