"""Deprecated: moved to :mod:`culign.serving.settings`. This alias goes in the next release."""
import warnings as _warnings

from .serving.settings import *  # noqa: F401,F403
from .serving.settings import __all__  # noqa: F401

_warnings.warn("culign.settings is deprecated: import culign.serving.settings", DeprecationWarning, stacklevel=2)
