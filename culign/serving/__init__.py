"""culign's serving layer, between ``service.py`` (HTTP) and the model:

- :mod:`.requests`: the request models, their value checks, :class:`ServingError`;
- :mod:`.router`: region names and API-key grants -> soft prompts, and ``/v1/models``;
- :mod:`.adapter_cache`: verified soft prompts over a registry that changes while serving;
- :mod:`.chat`: :class:`ChatService`, a request from body to reply (streamed or not);
- :mod:`.engines`: the inference seam, :func:`build_engine`, culign's scheduler and vLLM;
- :mod:`.settings` and :mod:`.auth`: the service's knobs and its API keys.

It imports the model and the registry, never HTTP frameworks or training.
"""
from __future__ import annotations

import warnings

from .chat import VERSION_HEADER, ChatService, Detokenizer, Prepared, Reply, Result
from .engines import build_engine, load_runtime
from .requests import ChatCompletionRequest, ChatRequest, ServingError
from .router import REGION_HEADER, RegionRouter
from .settings import ServiceSettings

__all__ = ["ChatCompletionRequest", "ChatRequest", "ChatService", "Detokenizer", "Prepared", "REGION_HEADER",
           "RegionRouter", "Reply", "Result", "ServingError", "ServiceSettings", "VERSION_HEADER", "build_engine",
           "load_runtime"]


class ChatEngine(ChatService):
    """Deprecated: :class:`ChatService` (``worker=`` is ``engine=``, ``.worker`` is ``.engine``); goes in the next
    release."""

    def __init__(self, runtime, registry, settings=None, *, worker=None):
        warnings.warn("culign.serving.ChatEngine is deprecated: use ChatService(engine=...)", DeprecationWarning,
                      stacklevel=2)
        super().__init__(runtime, registry, settings, engine=worker)

    @property
    def worker(self):
        return self.engine
