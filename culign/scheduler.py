"""Deprecated: moved to :mod:`culign.serving.engines.scheduler`. This alias goes in the next release."""
import warnings as _warnings

from .serving.engines.scheduler import *  # noqa: F401,F403
from .serving.engines.scheduler import __all__  # noqa: F401

_warnings.warn("culign.scheduler is deprecated: import culign.serving.engines.scheduler", DeprecationWarning, stacklevel=2)
