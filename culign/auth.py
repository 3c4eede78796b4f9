"""Deprecated: moved to :mod:`culign.serving.auth`. This alias goes in the next release."""
import warnings as _warnings

from .serving.auth import *  # noqa: F401,F403
from .serving.auth import __all__  # noqa: F401

_warnings.warn("culign.auth is deprecated: import culign.serving.auth", DeprecationWarning, stacklevel=2)
