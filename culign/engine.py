"""Deprecated: moved to :mod:`culign.serving.engines.base`. This alias goes in the next release."""
import warnings as _warnings

from .serving.engines.base import *  # noqa: F401,F403
from .serving.engines.base import __all__  # noqa: F401

_warnings.warn("culign.engine is deprecated: import culign.serving.engines.base", DeprecationWarning, stacklevel=2)
