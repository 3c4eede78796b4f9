"""Deprecated, and gone in the next release: the object-store registry is :class:`culign.registry.S3Registry`
(:mod:`culign.registry.s3`); open any registry with :func:`culign.registry.open_registry`.

What this module exported still works: ``ObjectRegistry(url, cache_dir=None)`` (an S3Registry whose cache defaults
to culign's), ``is_url``, ``CLAIM_FILE``, ``MANIFEST_FILE`` and ``RegistryUnavailable``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .registry import CLAIM_FILE, MANIFEST_FILE, RegistryUnavailable, S3Registry, default_cache_dir, is_url

warnings.warn("culign.object_registry is deprecated and goes in the next release: use culign.registry "
              "(open_registry, S3Registry)", DeprecationWarning, stacklevel=2)


class _S3RegistryUnderItsOldName(type):
    # ObjectRegistry(...) builds an S3Registry, and isinstance(open_registry("s3://..."), ObjectRegistry) holds as
    # before the rename. Not a subclass: S3Registry's ABC checks would recurse through one that defers to it.
    def __call__(cls, url: str, cache_dir: str | Path | None = None, fs=None) -> S3Registry:
        return S3Registry(url, default_cache_dir() if cache_dir is None else cache_dir, fs)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, S3Registry)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, S3Registry)


class ObjectRegistry(metaclass=_S3RegistryUnderItsOldName):
    """S3Registry under its old name, with the old default for ``cache_dir`` (culign's cache)."""


__all__ = ["ObjectRegistry", "is_url", "CLAIM_FILE", "MANIFEST_FILE", "RegistryUnavailable"]
