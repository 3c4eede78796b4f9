"""culign's BentoML service: one frozen model, many regions (soft prompts) picked per request.

    bentoml serve service:Culign            # then: curl -H 'X-Culign-Region: US' localhost:3000/chat -d '{...}'

HTTP in, runtime call, HTTP out: the logic (region selection, adapter cache, batched decoding) is culign/serving.py.
Env: CULIGN_MODEL / CULIGN_DTYPE / CULIGN_DEVICE (the runtime), CULIGN_ADAPTERS (registry, default adapters/ here),
CULIGN_MAX_TOKENS (cap), CULIGN_RESCAN_SECONDS, CULIGN_BATCH_WINDOW_MS, CULIGN_MAX_BATCH, CULIGN_LOG_LEVEL (docs/deploy.md).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import bentoml
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from culign.registry import Registry
from culign.serving import REGION_HEADER, ChatCompletionRequest, ChatEngine, ChatRequest, Reply, load_runtime

log = logging.getLogger("culign.service")


class _QuietBadBodies(logging.Filter):
    """BentoML logs a body that fails validation as an ERROR with a traceback; the client got a 400 and the access
    log has the line, so that is not a server error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ValidationError))


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietBadBodies())


def to_response(reply: Reply, ctx: bentoml.Context | None = None) -> Response:
    if ctx is not None:
        ctx.response.status_code = reply.status  # BentoML copies the context's status onto what we return
    if reply.stream is not None:
        return StreamingResponse(reply.stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **reply.headers})
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def list_models(request: Request) -> Response:
    return to_response(bentoml.get_current_service().engine.models())


# GET routes are not @bentoml.api material: a small Starlette app, mounted at /v1, serves them.
openai_app = Starlette(routes=[Route("/models", list_models, methods=["GET"])])


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(name="culign", workers=1, traffic={"timeout": 600})
class Culign:
    def __init__(self) -> None:
        logging.getLogger("culign").setLevel(os.environ.get("CULIGN_LOG_LEVEL", "INFO"))  # BentoML's root: WARNING
        root = os.environ.get("CULIGN_ADAPTERS") or str(Path(__file__).resolve().parent / "adapters")
        runtime = load_runtime()  # the embedded default, or CULIGN_MODEL; decoding runs on the worker thread
        log.info("serving %s (%s) with adapters from %s", runtime.name, runtime.fingerprint, root)
        self.engine = ChatEngine(runtime, Registry(root))
        self.engine.adapters.warm()

    @bentoml.api(route="/chat")
    async def chat(self, body: ChatRequest, /, ctx: bentoml.Context) -> dict:
        """Chat with the model under the region named by the X-Culign-Region header (none: the base model)."""
        return to_response(await self.engine.chat(body, ctx.request.headers.getlist(REGION_HEADER)), ctx)

    @bentoml.api(route="/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, /, ctx: bentoml.Context) -> dict:
        """OpenAI-compatible chat; the region comes from X-Culign-Region or the `model` field."""
        return to_response(await self.engine.chat_completions(body, ctx.request.headers.getlist(REGION_HEADER)), ctx)

    def __is_ready__(self) -> bool:
        return self.engine.worker.alive()

    def __is_alive__(self) -> bool:
        return self.engine.worker.alive()

    @bentoml.on_shutdown
    def close(self) -> None:
        self.engine.close()
