"""Deprecated: moved to the package :mod:`culign.model` (hardware, loading, runtime, scoring, decoding). This
alias goes in the next release; import from culign.model (and the cache root from culign.defaults)."""
import warnings as _warnings

from .defaults import cache_root  # noqa: F401
from .model import *  # noqa: F401,F403
from .model import __all__ as _model_names
from .model.hardware import _bf16_probe  # noqa: F401

__all__ = [*_model_names, "cache_root"]

_warnings.warn("culign.runtime is deprecated: import culign.model", DeprecationWarning, stacklevel=2)
