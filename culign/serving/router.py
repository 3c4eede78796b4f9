"""Which soft prompt a request gets: the region router.

A request names a region by the ``X-Culign-Region`` header and/or OpenAI's ``model`` field (``"US"``, ``"US@2"``,
``"<base>:US"``, or the base model's own name for none); an API key may grant only some regions. The router checks
the grant on the names as given (so a key learns nothing of regions it may not use), resolves the names through the
adapter cache, and lists what a caller may use for ``/v1/models`` - like vLLM's ``OpenAIServingModels``. Blocking
(the cache may rescan the registry): call it off the event loop. Knows nothing of HTTP frameworks or engines.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .. import targets
from ..regions import BadRegionSpec, parse_region, show
from .adapter_cache import Adapter, AdapterCache, AdapterRefused, UnknownRegion
from .requests import ServingError

__all__ = ["Allow", "REGION_HEADER", "RegionRouter"]

REGION_HEADER = "X-Culign-Region"
Allow = Callable[[str | None], bool]  # may this caller use that region (None: the base model)? From its API key


def _unavailable(e: UnknownRegion | AdapterRefused) -> ServingError:
    if isinstance(e, AdapterRefused):  # ours to fix, not the client's: 503, with the reason
        return ServingError(503, str(e), kind="adapter_refused", param=e.source, available=e.available)
    return ServingError(404, str(e), kind="not_found_error", param=e.source, available=e.available)


class RegionRouter:
    """Region names -> verified soft prompts, for one base model and one adapter cache."""

    def __init__(self, adapters: AdapterCache, base_name: str):
        self.adapters, self.base_name = adapters, base_name
        # the base model answers to its full name, the name without "embedded:", and its folder's last part
        self.base_names = {base_name, base_name.split(":", 1)[-1], base_name.rstrip("/").rsplit("/", 1)[-1]}

    def select(self, region_header: Sequence[str], model: str | None = None,
               allow: Allow | None = None) -> Adapter | None:
        """The adapter a request names by header and/or OpenAI ``model``; None = the base model. A region the
        caller's key may not use is a 403, whether or not the registry has it."""
        values = [v for v in region_header if v.strip()]
        if len(values) > 1:
            raise ServingError(400, f"give one {REGION_HEADER} header, not {len(values)}", param=REGION_HEADER)
        if allow is not None:
            self._check_allowed(values[0].strip() if values else None, model, allow)
        try:
            from_header = self.adapters.lookup(parse_region(values[0].strip(), REGION_HEADER), REGION_HEADER) \
                if values else None
            from_model = self._model_region(model)
        except BadRegionSpec as e:
            raise ServingError(400, str(e), param=e.source) from None
        except (UnknownRegion, AdapterRefused) as e:
            raise _unavailable(e) from None
        if from_header and from_model and from_header.ref != from_model.ref:
            raise ServingError(400, f"{REGION_HEADER} selects {from_header.ref} but model {show(model)} selects "
                                    f"{from_model.ref}; give one, or make them agree", param="model")
        return from_header or from_model

    def _strip_base(self, model: str) -> str:
        """``"<base>:US"`` -> ``"US"``; anything else unchanged."""
        for base in self.base_names:
            if model.startswith(base + ":"):
                return model[len(base) + 1:]
        return model

    def _check_allowed(self, header: str | None, model: str | None, allow: Allow) -> None:
        """403 for a region (or the base model) outside the key's grant. Checked on the names as given (aliases
        resolved like the registry does, never touching it), so a key learns nothing of regions it may not use."""
        asked: list[tuple[str | None, str]] = []
        if header is not None:
            asked.append((header, REGION_HEADER))
        if model and model not in self.base_names:
            asked.append((self._strip_base(model), "model"))
        if not asked:  # the bare model: named by model (its base name), or by giving no region at all
            asked.append((None, "model" if model is not None else REGION_HEADER))
        for value, source in asked:
            if value is None:
                if not allow(None):
                    raise ServingError(403, "this API key may not use the base model: name a region it may use",
                                       kind="permission_error", param=source)
                continue
            try:
                spec = parse_region(value, source)
            except BadRegionSpec as e:
                raise ServingError(400, str(e), param=e.source) from None
            names = {spec.name.upper()}
            try:
                names.add(targets.resolve(spec.name).key.upper())  # "China" -> "CN"
            except ValueError:
                pass
            if not any(allow(n) for n in names):
                raise ServingError(403, f"this API key may not use region {show(spec.name)} (in {source})",
                                   kind="permission_error", param=source)

    def _model_region(self, model: str | None) -> Adapter | None:
        """``model``: the base model's name (no region), ``"US"``, ``"US@2"`` or ``"<base>:US"``."""
        if not model or model in self.base_names:
            return None
        return self.adapters.lookup(parse_region(self._strip_base(model), "model"), "model")

    def models(self, allow: Allow | None, created: int, serving: dict) -> list[dict]:
        """``/v1/models``' entries: the base model, then every region with its servable versions (those the caller's
        key may use); ``serving`` (engine name, batch invariance) is added to each."""
        available = self.adapters.available()
        data = []
        if allow is None or allow(None):
            data.append({"id": self.base_name, "object": "model", "created": created, "owned_by": "culign",
                         "region": None, **serving})
        for region, versions in available.items():
            if versions and (allow is None or allow(region)):
                verdicts = self.adapters.verdicts(region)  # the post-training verdict of each version, from provenance
                data.append({"id": region, "object": "model", "created": created, "owned_by": "culign",
                             "root": self.base_name, "parent": self.base_name, "region": region,
                             "latest_version": versions[-1], "versions": versions,
                             "forced_invalid_versions": self.adapters.forced_invalid(region),
                             "verdict": verdicts.get(versions[-1]),
                             "verdicts": {str(v): verdicts[v] for v in versions if v in verdicts}, **serving})
        return data
