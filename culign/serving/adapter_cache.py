"""The hot adapter cache: (region, version) -> a verified soft prompt, over a registry that may change while serving.

Blocking (directory scans, sha256 checks): call it from a worker thread, never from the event loop. Knows nothing
of HTTP: a region or version it cannot serve raises :class:`UnknownRegion` (not the registry's
``AdapterNotFound``: this one names where the request named it), a refused one :class:`AdapterRefused`, each naming
what was asked for, where it came from (header or ``model`` field) and what is available.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .. import targets
from ..model.runtime import Runtime
from ..regions import RegionSpec, show
from ..registry import WEIGHTS_FILE, AdapterInfo, AdapterRegistry, RegistryError, RegistryUnavailable

__all__ = ["Adapter", "AdapterCache", "AdapterRefused", "AdapterUnavailable", "UnknownRegion"]

log = logging.getLogger("culign.adapters")


class AdapterUnavailable(LookupError):
    def __init__(self, message: str, source: str, available: list[str]):
        super().__init__(f"{message}; available regions: {', '.join(available) or 'none'}")
        self.source, self.available = source, available


class UnknownRegion(AdapterUnavailable):
    """No such region or version in the registry."""


class AdapterRefused(AdapterUnavailable):
    """It is in the registry but failed the integrity or compatibility checks (the message says why)."""


@dataclass(frozen=True)
class Adapter:
    """A verified soft prompt, ready on the runtime's device and dtype."""
    info: AdapterInfo
    prompt: torch.Tensor  # [n, hidden]
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the weights file when it was verified

    @property
    def ref(self) -> str:
        return self.info.ref


def _stamp(info: AdapterInfo) -> tuple[int, int] | None:
    try:
        st = (info.path / WEIGHTS_FILE).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class AdapterCache:
    """The registry listing is rescanned every ``rescan_every`` seconds and whenever a request names a region or
    version the last scan did not have, so an adapter trained while the service runs is served without a restart
    and a new version becomes the latest. Adapters that fail the checks are refused (logged once, with the reason)
    and never reach the model; a region's request for its latest version gets the newest one that passes.

    Entries are keyed by the scanned info (which includes its creation time), not by (region, version): a version
    number removed and saved again is a new entry, never the stale one. A loaded adapter whose file changes on
    disk is verified again at the next rescan; if the new file fails, the operator is told (once) that memory and
    disk differ, and the verified copy in memory keeps being served until the registry lists a good version.
    """

    def __init__(self, registry: AdapterRegistry, runtime: Runtime, rescan_every: float = 5.0, max_loaded: int = 256,
                 prompt_dtype: torch.dtype | None = None):
        self.registry, self.runtime = registry, runtime
        # what a loaded soft prompt is cast to: the dtype the engine computes in (the runtime's, unless it only
        # embeds for another engine: vLLM's prompts are handed over in float32)
        self.prompt_dtype = prompt_dtype or runtime.dtype
        self.rescan_every, self.max_loaded = rescan_every, max_loaded
        self._lock = threading.RLock()
        self._infos: dict[str, dict[int, AdapterInfo]] = {}  # region -> version -> info, from the last scan
        self._scanned_at = float("-inf")
        self._forced_at = float("-inf")
        self._warned: set[str] = set()
        self._loaded: OrderedDict[AdapterInfo, Adapter] = OrderedDict()  # LRU
        self._refused: dict[AdapterInfo, str] = {}
        # (region, version) -> why the scan itself could not list it (truncated, garbled, a copy, half-written)
        self._unlisted: dict[str, dict[int, str]] = {}
        self.store_unreachable = False  # the last rescan could not reach the (object-store) registry
        self.store_failures = 0  # rescans that could not reach it, since start

    # ------------------------------------------------------------------ listing
    def rescan(self) -> None:
        try:
            infos, warnings = self.registry.scan()
        except RegistryUnavailable as e:
            # an object store that cannot be reached: keep serving the last good listing and the verified prompts
            # in memory (or in the local cache), warn once per outage, count it; try again at the next rescan
            with self._lock:
                self._scanned_at = time.monotonic()
                self.store_failures += 1
                first = not self.store_unreachable
                self.store_unreachable = True
            if first:
                log.warning("%s; serving the last good listing (%d regions) until it is back", e, len(self._infos))
            return
        if self.store_unreachable:
            log.warning("registry reachable again")
            self.store_unreachable = False
        table: dict[str, dict[int, AdapterInfo]] = {}
        for info in infos:
            table.setdefault(info.region, {})[info.version] = info
        unlisted: dict[str, dict[int, str]] = {}
        for w in warnings:
            if getattr(w, "region", None) is not None:  # a ScanWarning: the server can name it in its answer
                unlisted.setdefault(w.region, {})[w.version] = f"{w.ref} refused as {w.kind}: {w.reason}"
        with self._lock:
            self._infos, self._unlisted, self._scanned_at = table, unlisted, time.monotonic()
            live = {i for vs in table.values() for i in vs.values()}
            self._refused = {i: why for i, why in self._refused.items() if i in live}  # forget what is gone
            for info in [i for i in self._loaded if i not in live]:
                del self._loaded[info]
            loaded = list(self._loaded.values())
        for w in warnings:
            self._warn_once(w, "registry: %s", w)
        for adapter in loaded:
            self._check_disk(adapter)

    def _warn_once(self, key: str, fmt: str, *args) -> None:
        if key not in self._warned:  # a broken folder would otherwise be logged on every rescan and request
            self._warned.add(key)
            log.warning(fmt, *args)

    def _check_disk(self, adapter: Adapter) -> None:
        stamp = _stamp(adapter.info)
        if stamp == adapter.stamp:
            return
        try:
            self.registry.load(adapter.info.region, adapter.info.version, hidden_size=self.runtime.hidden_size,
                               base_fingerprint=self.runtime.fingerprint)
        except (RegistryError, OSError, ValueError) as e:
            self._warn_once(f"drift:{adapter.ref}:{stamp}", "adapter %s changed on disk since it was verified and "
                            "now fails the checks (%s); serving the verified copy from memory", adapter.ref, e)
            return
        with self._lock:  # the file was rewritten with the same content (or touched): it still verifies
            if adapter.info in self._loaded:
                self._loaded[adapter.info] = Adapter(adapter.info, adapter.prompt, stamp)

    def _fresh(self) -> None:
        if time.monotonic() - self._scanned_at >= self.rescan_every:
            self.rescan()

    def _rescan_for_unknown(self) -> None:
        # A request naming something unknown may name an adapter saved a moment ago; the short floor keeps a flood
        # of bad names from turning into a flood of directory scans.
        if time.monotonic() - self._forced_at >= 0.2:
            self._forced_at = time.monotonic()
            self.rescan()

    def available(self) -> dict[str, list[int]]:
        """Region -> servable versions (ascending), refused ones left out."""
        self._fresh()
        with self._lock:
            return {r: [v for v, info in sorted(vs.items()) if info not in self._refused]
                    for r, vs in sorted(self._infos.items())}

    def forced_invalid(self, region: str) -> list[int]:
        """Versions of ``region`` trained with --force-invalid (their model failed the validity check), from the last
        scan's provenance; no rescan, so the event loop may call it."""
        with self._lock:
            return [v for v, info in sorted(self._infos.get(region, {}).items()) if info.forced_invalid]

    def verdicts(self, region: str) -> dict[int, str]:
        """Version -> its post-training verdict (culign.verdict; "not judged" before verdicts existed), from the
        last scan's provenance; no rescan, like :meth:`forced_invalid`."""
        with self._lock:
            return {v: info.verdict for v, info in sorted(self._infos.get(region, {}).items())}

    def _canonical(self, name: str) -> str | None:
        """The registry's own spelling of a region: its name case-insensitively, else the CLI's alias lookup."""
        by_lower = {r.lower(): r for r in [*self._unlisted, *self._infos]}
        if name.lower() in by_lower:
            return by_lower[name.lower()]
        try:
            key = targets.resolve(name).key  # "China", "CHI", "cn" -> "CN"
        except ValueError:  # UnknownRegionError is a ValueError
            return None
        return by_lower.get(key.lower())

    # ------------------------------------------------------------------ lookup
    def lookup(self, spec: RegionSpec, source: str = "region") -> Adapter:
        """The adapter a request asked for; UnknownRegion / AdapterRefused naming ``source`` otherwise."""
        self._fresh()
        with self._lock:
            region = self._canonical(spec.name)
            if region is None or (spec.version is not None and spec.version not in self._infos.get(region, {})):
                self._rescan_for_unknown()  # maybe trained since the last scan
                region = self._canonical(spec.name)
            if region is None:
                raise self._error(UnknownRegion, f"unknown region {show(spec.name)} in {source}", source)
            versions, unlisted = self._infos.get(region, {}), self._unlisted.get(region, {})
            if spec.version is not None:
                if spec.version not in versions and spec.version in unlisted:
                    raise self._error(AdapterRefused, f"adapter {unlisted[spec.version]}", source)
                if spec.version not in versions:
                    raise self._error(UnknownRegion, f"region {region} has no version {spec.version} (in {source})",
                                      source)
                adapter = self._load(versions[spec.version])
                if adapter is None:
                    raise self._error(AdapterRefused, f"adapter {region}@{spec.version} is refused: "
                                      f"{self._refused[versions[spec.version]]}", source)
                return adapter
            for version in sorted(versions, reverse=True):  # the latest that passes the checks
                adapter = self._load(versions[version])
                if adapter is not None:
                    return adapter
            reasons = "; ".join([f"{i.ref}: {self._refused[i]}" for i in versions.values() if i in self._refused]
                                + [why for _, why in sorted(unlisted.items())])
            raise self._error(AdapterRefused, f"region {region} is refused, every version failed the integrity or "
                              f"compatibility checks ({reasons})", source)

    def _error(self, kind: type[AdapterUnavailable], message: str, source: str) -> AdapterUnavailable:
        with self._lock:
            available = [r for r, vs in self._infos.items() if any(i not in self._refused for i in vs.values())]
        return kind(message, source, sorted(available))

    def _load(self, info: AdapterInfo) -> Adapter | None:
        if info in self._loaded:
            self._loaded.move_to_end(info)
            return self._loaded[info]
        if info in self._refused:
            return None
        stamp = _stamp(info)
        try:
            loaded = self.registry.load(info.region, info.version, hidden_size=self.runtime.hidden_size,
                                        base_fingerprint=self.runtime.fingerprint)
        except RegistryUnavailable:  # not a verdict on the adapter: it may load once the store is back
            return None
        except (RegistryError, OSError, ValueError) as e:  # corrupt, incompatible, vanished, unreadable
            self._refused[info] = str(e)
            self._warn_once(f"refused:{info}", "refusing adapter %s: %s", info.ref, e)
            return None
        adapter = Adapter(loaded.info, loaded.prompt.to(self.runtime.device, self.prompt_dtype), stamp)
        self._loaded[info] = adapter
        if len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return adapter

    def warm(self) -> None:
        """Load (and so verify) the latest adapter of every region now, so refusals show in the startup log."""
        for region in self.available():
            try:
                self.lookup(RegionSpec(region))
            except AdapterUnavailable as e:
                log.warning("%s", e)
