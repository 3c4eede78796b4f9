"""Deprecated: moved to :mod:`culign.serving.adapter_cache`. This alias goes in the next release."""
import warnings as _warnings

from .serving.adapter_cache import *  # noqa: F401,F403
from .serving.adapter_cache import __all__  # noqa: F401

_warnings.warn("culign.adapter_cache is deprecated: import culign.serving.adapter_cache", DeprecationWarning, stacklevel=2)
