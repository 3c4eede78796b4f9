"""What every adapter registry offers (:class:`AdapterRegistry`) and the rules they share (:class:`BaseRegistry`).

A backend only says how to list, read, publish and delete versions where it keeps them; which version a name means,
which ones may be served and what the errors say is decided here, once, so a folder and an object store answer
every question alike.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .format import (AdapterCorrupt, AdapterInfo, AdapterNotFound, InvalidEntry, LoadedAdapter, NewVersion,
                     RegistryError, ScanWarning, check_region, check_version, checked_load, new_version, problems_of)

log = logging.getLogger("culign.registry")

MAX_PUBLISH_ATTEMPTS = 1000  # numbers tried before a save gives up (each taken by a concurrent publisher)


@runtime_checkable
class AdapterRegistry(Protocol):
    """Soft prompts per region and version: what training, evaluation and serving use, whatever the backend."""

    root: Path | str  # what messages and listings print: the folder, or the store's URL

    def scan(self) -> tuple[list[AdapterInfo], list[ScanWarning]]: ...

    def regions(self) -> list[str]: ...

    def versions(self, region: str) -> list[int]: ...

    def resolve(self, region: str, version: int | None = None) -> AdapterInfo: ...

    def load(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
             base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter: ...

    def verify(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
               base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> list[str]: ...

    def save(self, region: str, prompt: torch.Tensor, *, base_model: str, base_fingerprint: str,
             provenance: dict, files: dict[str, bytes] | None = None, num_layers: int | None = None,
             num_attention_heads: int | None = None) -> AdapterInfo: ...

    def remove(self, region: str, version: int | None = None) -> list[AdapterInfo]: ...


class Catalog(dict[str, list[int]]):
    """One listing of a registry: region, as the registry spells it -> its published versions, ascending (possibly
    none: a region whose versions were all removed keeps its numbers). The primitives that act on what was listed
    get it back, so a backend may carry more in it (the object store: the objects it listed)."""


class BaseRegistry(ABC):
    """The registry rules, over five backend primitives: :meth:`_list`, :meth:`_read`, :meth:`_publish`,
    :meth:`_delete` and :meth:`_path`.

    Region names match case-insensitively (the exact spelling wins; a name that matches two stored spellings only
    up to case is an error). "Latest" is the highest version that reads: a broken newest version never takes its region down.
    """

    root: Path | str

    # ------------------------------------------------------------------ what a backend provides
    @abstractmethod
    def _list(self) -> Catalog:
        """Every region with its published versions (readable or not)."""

    @abstractmethod
    def _read(self, catalog: Catalog, region: str, version: int) -> tuple[AdapterInfo, dict]:
        """AdapterInfo and provenance of a listed version, read (metadata and weights header, no hashing) from a
        local folder holding its files; raises InvalidEntry saying why it is unusable."""

    @abstractmethod
    def _publish(self, catalog: Catalog, region: str, new: NewVersion) -> int:
        """Publish the version under the next number of ``region`` that was never used; returns that number."""

    @abstractmethod
    def _delete(self, catalog: Catalog, region: str, version: int) -> None:
        """Make a version disappear whole; its number stays used."""

    @abstractmethod
    def _path(self, region: str, version: int) -> Path:
        """The local folder that holds (or would hold) a version's files."""

    def _where(self, region: str, version: int) -> str:
        """A version's place, for messages."""
        return str(self._path(region, version))

    # ------------------------------------------------------------------ regions
    def _region_name(self, catalog: Catalog, region: str) -> str | None:
        """The registry's own spelling of ``region``, matched case-insensitively (exact spelling wins)."""
        if region in catalog:
            return region
        matches = sorted(name for name in catalog if name.casefold() == region.casefold())
        if len(matches) > 1:
            raise RegistryError(f"region {region!r} is ambiguous: {', '.join(matches)} all exist")
        return matches[0] if matches else None

    def _existing_region(self, catalog: Catalog, region: str) -> str:
        name = self._region_name(catalog, region)
        if name is None:
            raise self._not_found(f"no adapter for region {region!r}")
        return name

    def _not_found(self, what: str) -> AdapterNotFound:
        available = self.regions()
        return AdapterNotFound(f"{what}; available regions: {', '.join(available) or 'none'}", available)

    def _no_such_version(self, region: str, version: int, published: list[int]) -> AdapterNotFound:
        return AdapterNotFound(f"adapter {region}@{version} not found; versions: {published}", self.regions())

    def _try_read(self, catalog: Catalog, region: str, version: int) -> AdapterInfo | None:
        try:
            return self._read(catalog, region, version)[0]
        except InvalidEntry as e:
            log.warning("skipping adapter %s@%d: %s", region, version, e)
            return None

    # ------------------------------------------------------------------ read
    def scan(self) -> tuple[list[AdapterInfo], list[ScanWarning]]:
        """Every readable version, sorted by (region, version), plus one :class:`ScanWarning` per refused one
        (a str naming the adapter and why: ``SA@1 refused as corrupt: adapter_model.safetensors is truncated ...``).

        Cheap: metadata and weight headers, no hashing (an object store checks a version's download against its
        manifest once, then reads the cached copy). A bad entry never hides the good ones.
        """
        catalog = self._list()
        infos, warnings = [], []
        for region, versions in sorted(catalog.items()):
            for version in versions:
                try:
                    infos.append(self._read(catalog, region, version)[0])
                except InvalidEntry as e:
                    warnings.append(ScanWarning(region, version, e.kind, str(e), self._path(region, version)))
        for w in warnings:
            log.debug("scan skipped %s", w)
        return infos, warnings

    def regions(self) -> list[str]:
        return sorted({info.region for info in self.scan()[0]})

    def versions(self, region: str) -> list[int]:
        """Readable versions of a region, ascending; AdapterNotFound when it has none."""
        check_region(region)
        catalog = self._list()
        name = self._existing_region(catalog, region)
        good = [v for v in catalog[name] if self._try_read(catalog, name, v) is not None]
        if not good:
            raise self._not_found(f"adapter {region} has no readable versions")
        return good

    def resolve(self, region: str, version: int | None = None) -> AdapterInfo:
        """Info of REGION@version; version None is the highest readable version."""
        return self._resolve(region, version)[0]

    def _resolve(self, region: str, version: int | None) -> tuple[AdapterInfo, dict]:
        check_version(version)
        check_region(region)
        catalog = self._list()
        name = self._existing_region(catalog, region)
        published = catalog[name]
        if version is None:
            reasons = []
            for v in reversed(published):  # latest readable: a broken newest version must not take the region down
                try:
                    return self._read(catalog, name, v)
                except InvalidEntry as e:
                    log.warning("skipping adapter %s@%d: %s", name, v, e)
                    reasons.append(f"{name}@{v} refused as {e.refused_as}: {e}")
            if reasons:  # it is there, but nothing in it may be served: say why, not "unknown"
                raise AdapterCorrupt(f"adapter {name} is refused, no version passes the checks: " + "; ".join(reasons))
            raise self._not_found(f"adapter {name} has no readable versions")
        if version not in published:
            raise self._no_such_version(name, version, published)
        try:
            return self._read(catalog, name, version)
        except InvalidEntry as e:
            if e.kind == "unsafe":  # named explicitly, a way out of the registry is the registry's fault
                raise RegistryError(str(e)) from None
            raise AdapterCorrupt(f"adapter {name}@{version} is refused as {e.refused_as}: {e} "
                                 f"({self._where(name, version)})") from None

    def load(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
             base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter:
        """Read and check an adapter: compatibility with the caller's model first (cheap), then integrity."""
        return checked_load(*self._resolve(region, version), hidden_size, base_fingerprint, allow_base_mismatch)

    def verify(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
               base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> list[str]:
        """Every problem load() would raise for, plus metadata that disagrees with the stored files; [] when sound.

        Unknown adapters and invalid names still raise (AdapterNotFound / ValueError): there is nothing to verify.
        """
        try:
            info, prov = self._resolve(region, version)
        except AdapterCorrupt as e:
            return [str(e)]
        # a version whose culign.json names another region or version failed in _resolve already
        return problems_of(info, prov, hidden_size, base_fingerprint, allow_base_mismatch)

    # ------------------------------------------------------------------ write
    def save(self, region: str, prompt: torch.Tensor, *, base_model: str, base_fingerprint: str,
             provenance: dict, files: dict[str, bytes] | None = None, num_layers: int | None = None,
             num_attention_heads: int | None = None) -> AdapterInfo:
        """Store a soft prompt as the next version of ``region`` and return its info.

        Stamped fields (region, version, base model, shapes, hashes, time) override caller keys of the same name.
        ``num_layers`` / ``num_attention_heads`` (default: the provenance keys of those names) only fill PEFT's
        config; PEFT takes them from the base model when they are absent. Nothing is written when the arguments
        are invalid; a version is visible only once it is complete.
        """
        new = new_version(region, prompt, base_model, base_fingerprint, provenance, files, num_layers,
                          num_attention_heads)
        catalog = self._list()
        name = self._region_name(catalog, region) or region
        version = self._publish(catalog, name, new)
        info = self.resolve(name, version)
        log.info("saved adapter %s (%d x %d) at %s", info.ref, *new.shape, self._where(name, version))
        return info

    def remove(self, region: str, version: int | None = None) -> list[AdapterInfo]:
        """Remove one version, or every version when version None (unreadable ones too), each as a whole.

        A removed version's number is never given to another version (servers cache adapters by REGION@version).
        Returns what was removed; an unreadable version is reported with empty metadata.
        """
        check_version(version)
        check_region(region)
        catalog = self._list()
        name = self._existing_region(catalog, region)
        published = catalog[name]
        if version is not None and version not in published:
            raise self._no_such_version(name, version, published)
        if not published:
            raise self._not_found(f"adapter {name} has no versions")
        removed = []
        for v in [version] if version is not None else published:
            removed.append(self._try_read(catalog, name, v) or AdapterInfo.unreadable(name, v, self._path(name, v)))
            self._delete(catalog, name, v)
            log.info("removed adapter %s@%d (%s)", name, v, self._where(name, v))
        return removed
