"""Deprecated: moved to :mod:`culign.serving.engines.vllm`. This alias goes in the next release."""
import warnings as _warnings

from .serving.engines.vllm import *  # noqa: F401,F403
from .serving.engines.vllm import __all__  # noqa: F401

_warnings.warn("culign.vllm_engine is deprecated: import culign.serving.engines.vllm", DeprecationWarning, stacklevel=2)
