"""What a chat request may say, and how a refusal is said: the request models (``POST /chat`` and OpenAI's
``/v1/chat/completions``), the value checks against the ranges the OpenAI API defines, and :class:`ServingError`.
Knows nothing of HTTP frameworks, engines or regions."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from ..regions import show

__all__ = ["ChatCompletionRequest", "ChatRequest", "ContentPart", "MAX_STOP", "MAX_TOP_LOGPROBS", "Message",
           "ServingError", "StreamOptions", "UNSUPPORTED", "check_values"]

MAX_STOP = 4  # stop sequences per request (the OpenAI API's limit)
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit


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
    """``POST /chat``. Unknown fields are refused (400 naming them), values are checked by check_values."""
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

