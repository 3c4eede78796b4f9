"""The adapter registry: trained soft prompts, one immutable version per region and number.

- :mod:`.format`: the files of one version (PEFT PROMPT_TUNING + culign.json) and their checks;
- :mod:`.base`: the interface (:class:`AdapterRegistry`) and the rules every backend shares (:class:`BaseRegistry`);
- :mod:`.local`: a folder (:class:`LocalRegistry`, also called ``Registry``);
- :mod:`.s3`: an object store, ``s3://BUCKET/PREFIX`` (:class:`S3Registry`).

This module is the only one that knows the backends: :func:`open_registry` picks one for a location.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..defaults import cache_root
from .base import AdapterRegistry, BaseRegistry, Catalog
from .format import (PEFT_CONFIG_FILE, PROVENANCE_FILE, REFUSAL_WORDS, REGION_NAME_RE, TENSOR_KEY, VERSION_DIR_RE,
                     WEIGHTS_FILE, AdapterCorrupt, AdapterIncompatible, AdapterInfo, AdapterNotFound, InvalidEntry,
                     LoadedAdapter, NewVersion, RegistryError, RegistryUnavailable, ScanWarning, checked_load,
                     new_version, peft_config, problems_of, read_info)
from .local import HIGH_WATER_FILE, PAUSE_ENV, STALE_AFTER_S, LocalRegistry
from .s3 import CLAIM_FILE, MANIFEST_FILE, URL_RE, S3Registry, split_url

Registry = LocalRegistry  # its name from before there was a second backend: Registry(path) keeps working


def is_url(root: str | os.PathLike) -> bool:
    """Whether ``root`` names an object store (``file://`` and every Path are folders)."""
    return isinstance(root, str) and bool(URL_RE.match(root)) and not root.startswith("file://")


@dataclass(frozen=True)
class Location:
    """Where a registry lives: a local folder (``path``), or an object store (``url`` with its ``bucket`` and
    ``prefix``)."""

    path: Path | None = None
    url: str | None = None
    bucket: str | None = None
    prefix: str = ""

    @property
    def remote(self) -> bool:
        """An object store (reached over the network), not a folder."""
        return self.url is not None

    def __str__(self) -> str:
        return self.url if self.url is not None else str(self.path)


def parse_location(text: str | os.PathLike | Location) -> Location:
    """A registry as written by a user: a folder (``file://`` allowed) or a store URL, checked for shape only
    (nothing is contacted); ValueError saying what is wrong with a malformed URL or bucket name."""
    if isinstance(text, Location):
        return text
    if is_url(text):
        _, bucket, prefix = split_url(text)
        return Location(url=text.rstrip("/"), bucket=bucket, prefix=prefix)
    return Location(path=Path(str(text).removeprefix("file://")))


def default_cache_dir() -> Path:
    """Where verified downloads from object stores go unless a cache folder is given."""
    return cache_root() / "registry-cache"


def open_registry(location: str | os.PathLike | Location, cache_dir: str | Path | None = None) -> AdapterRegistry:
    """The registry at ``location``: a folder (:class:`LocalRegistry`) or an object-store URL such as
    ``s3://bucket/prefix`` (:class:`S3Registry`, downloads cached under ``cache_dir``, default
    :func:`default_cache_dir`); both have the same methods (:class:`AdapterRegistry`)."""
    where = parse_location(location)
    if where.remote:
        return S3Registry(where.url, default_cache_dir() if cache_dir is None else cache_dir)
    return LocalRegistry(where.path)


__all__ = [
    "AdapterRegistry", "BaseRegistry", "Catalog", "LocalRegistry", "Registry", "S3Registry",
    "Location", "parse_location", "open_registry", "is_url", "default_cache_dir",
    "RegistryError", "AdapterNotFound", "AdapterCorrupt", "AdapterIncompatible", "RegistryUnavailable",
    "InvalidEntry", "AdapterInfo", "LoadedAdapter", "ScanWarning", "NewVersion",
    "new_version", "peft_config", "read_info", "checked_load", "problems_of",
    "WEIGHTS_FILE", "PEFT_CONFIG_FILE", "PROVENANCE_FILE", "TENSOR_KEY", "REGION_NAME_RE", "VERSION_DIR_RE",
    "REFUSAL_WORDS", "PAUSE_ENV", "STALE_AFTER_S", "HIGH_WATER_FILE", "CLAIM_FILE", "MANIFEST_FILE",
]
