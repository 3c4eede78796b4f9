"""culign's Python API: what the command line does, as functions with typed results (docs/python.md).

    import culign
    model = culign.load_model()                          # the embedded SmolLM2, float32 for scoring
    result = culign.evaluate("US", model=model, persona=True, presentations=["vsm/chat/asc"])
    result.to_dict(); result.to_pandas()                 # pandas only if installed

Everything here is stable: names, parameters and result fields change only with a major version. Progress bars are
off unless asked for; failures are the named exceptions listed in ``__all__`` (never SystemExit).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .evaluation import Comparison, Evaluation, Evaluator, Respondent
from .fanout import FanoutError, RegionJob, RegionResult, fan_out
from .optimize import SearchConfig
from .registry import (AdapterCorrupt, AdapterIncompatible, AdapterInfo, AdapterNotFound, LoadedAdapter, Registry,
                       RegistryError, RegistryUnavailable, open_registry)
from .runtime import ModelLoadError, Runtime
from .survey import Split, Survey, SurveyDataError
from .targets import Target, UnknownRegionError, parse_custom, resolve
from .trainer import TrainSettings, train as _train
from .validity import InvalidModelError, ValidityReport

DEFAULT_REGISTRY = Path("runs") / "adapters"  # where `culign train` saves by default


def load_model(model: str | None = None, *, device: str | None = None, dtype: str | None = None) -> Runtime:
    """A model for scoring: the embedded SmolLM2-135M-Instruct (None), an HF hub id from the local cache, or a local
    folder; float32 unless ``dtype`` says otherwise. Raises ModelLoadError."""
    return Runtime.load(model, device=device, dtype=dtype, scoring=True)


def region(name: str, *, saudi_variant: str | None = None) -> Target:
    """A region of the Hofstede table by code, ISO-2 alias or name. Raises UnknownRegionError."""
    return resolve(name, **({"saudi_variant": saudi_variant} if saudi_variant else {}))


def custom_target(spec: str, name: str = "custom") -> Target:
    """A target of your own: ``"PDI=80,IDV=20"`` or ``"@file.json"``. Raises ValueError naming the problem."""
    return parse_custom(spec, name)


def _target(target: str | Target) -> Target:
    return target if isinstance(target, Target) else region(target)


def _model(model: str | Runtime | None) -> Runtime:
    return model if isinstance(model, Runtime) else load_model(model)


def _split(survey: Survey, presentations: Sequence[str], split: Split | None, readout: str = "digit") -> Split:
    """Presentations (names or patterns of ``readout``'s templates), a split, or ``readout``'s default split."""
    if split is not None and presentations:
        raise ValueError("give presentations or a split, not both")
    if split is not None:
        return split
    if presentations:
        return Split(tuple(survey.expand(presentations, readout)))
    return survey.split(readout=readout)


@dataclass
class EvalResult:
    """Rows (naive, persona, adapters) scored on every presentation of a split, against one target."""
    comparison: Comparison
    model: str
    dtype: str

    @property
    def rows(self) -> list[Evaluation]:
        return list(self.comparison.rows)

    def row(self, label: str) -> Evaluation:
        for r in self.comparison.rows:
            if r.label == label:
                return r
        raise KeyError(f"no row {label!r}; rows: {[r.label for r in self.comparison.rows]}")

    def to_dict(self) -> dict:
        return {**self.comparison.to_dict(), "model": self.model, "dtype": self.dtype}

    def to_pandas(self):
        """One row per (respondent, presentation): indices, loss, option mass. Needs pandas (not a dependency)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas (or use to_dict())") from None
        records = []
        for label, row in self.comparison.to_dict()["rows"].items():
            for pres, s in row["per_presentation"].items():
                records.append({"row": label, "presentation": pres, **s["indices"], "loss": s["loss"],
                                "option_mass": s["option_mass"]})
        return pd.DataFrame.from_records(records)

    def table(self) -> str:
        from .report import format_table

        return format_table(self.comparison)


def evaluate(target: str | Target, *, model: str | Runtime | None = None, adapters: Sequence[str] = (),
             persona: bool = False, presentations: Sequence[str] = (), split: Split | None = None,
             readout: str = "digit", registry: str | Path | None = None) -> EvalResult:
    """Score the naive model, the persona baseline (``persona=True``) and adapters (``"US@2"`` in ``registry``, or
    adapter folders) on the VSM 2013 survey, as `culign eval` does. ``readout``: ``"digit"`` (the option digit's
    probability) or ``"label"`` (each option's label text as the continuation; its own templates). Without
    presentations or a split: the read-out's default split (digit: 9 training, 6 validation, 16 held-out)."""
    tgt, rt = _target(target), _model(model)
    survey = Survey.load()
    sp = _split(survey, presentations, split, readout)
    loaded = [load_adapter(a, rt, registry) for a in adapters]
    evaluator = Evaluator(rt, survey, tgt, sp)
    respondents = [Respondent.naive()] + ([Respondent.with_persona(tgt.display_name)] if persona else [])
    respondents += [Respondent(a.info.ref, a.prompt) for a in loaded]
    comparison = Comparison(tgt, sp, [evaluator.evaluate(r) for r in respondents])
    return EvalResult(comparison, rt.name, str(rt.dtype).replace("torch.", ""))


def load_adapter(ref: str | Path, model: Runtime, registry: str | Path | None = None) -> LoadedAdapter:
    """``"US"``, ``"US@2"`` in ``registry`` (default runs/adapters), or an adapter folder; checked against the
    model (width and fingerprint). Raises AdapterNotFound / AdapterCorrupt / AdapterIncompatible."""
    from .regions import parse_region

    path = Path(ref)
    if path.is_dir():
        reg, name, version = Registry(path.parent.parent), path.parent.name, int(path.name)
    else:
        spec = parse_region(str(ref), "adapter")
        reg, name, version = open_registry(registry or DEFAULT_REGISTRY), spec.name, spec.version
    return reg.load(name, version, hidden_size=model.hidden_size, base_fingerprint=model.fingerprint)


def check_validity(model: str | Runtime | None = None, *, readouts: Sequence[str] = ("digit", "label"),
             use_cache: bool = True, progress: bool = False) -> dict[str, ValidityReport]:
    """`culign validity`: per read-out, does the model's answer follow meaning and culture (order slope, agreement
    across wordings, persona spread against the noise band, Kendall's tau with Hofstede, option mass, verdict)?
    Cached per model, read-out and culign version."""
    from . import validity as checks

    rt = _model(model)
    survey = Survey.load()
    out = {}
    for r in readouts:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=checks.steps(r), desc=f"validity check ({r})", unit="presentation")
        out[r] = checks.check(rt, survey, r, use_cache=use_cache, on_step=bar and (lambda _n: bar.update()))
        if bar is not None:
            bar.close()
    return out


@dataclass
class TrainResult:
    adapter: AdapterInfo
    report: dict = field(repr=False)
    comparison: Comparison = field(repr=False)

    def to_dict(self) -> dict:
        return {"adapter": self.adapter.to_dict(), "report": self.report}

    def table(self) -> str:
        from .report import format_table

        return format_table(self.comparison)


def train(target: str | Target, *, model: str | Runtime | None = None, registry: str | Path | None = None,
          presentations: Sequence[str] = (), split: Split | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool = False, progress: bool = False, readout: str = "digit", force_invalid: bool = False,
          **search) -> TrainResult:
    """Train one region's soft prompt (`culign train --region`) and publish it to ``registry``. ``search`` takes
    :class:`culign.optimize.SearchConfig`'s fields (budget, popsize, tokens, dim, seed, optimizer, ...).

    The model's validity check for ``readout`` runs first (from the cache when there): a model that fails it raises
    InvalidModelError unless ``force_invalid``, and the adapter is then marked. Raises ValueError for bad settings,
    RegistryError when the registry refuses."""
    from .validity import choose_readout

    tgt, rt = _target(target), _model(model)
    survey = Survey.load()
    reports = check_validity(rt, readouts=[readout], progress=progress)
    chosen, forced = choose_readout(reports, readout, force_invalid)
    settings = TrainSettings(search=SearchConfig(**search), split=_split(survey, presentations, split, chosen))
    outcome = _train(rt, survey, tgt, settings, open_registry(registry or DEFAULT_REGISTRY),
                     checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume,
                     progress=progress, echo=print if progress else (lambda _m: None), readout=chosen,
                     validity={r: v.summary() for r, v in reports.items()}, forced_invalid=forced)
    return TrainResult(outcome.adapter, outcome.report, outcome.comparison)


def train_regions(targets: Sequence[str | Target], *, model: str | None = None, registry: str | Path | None = None,
                  presentations: Sequence[str] = (), split: Split | None = None, checkpoint_dir: str | None = None,
                  resume: bool = False, ray_address: str | None = None, cpus_per_region: float = 1,
                  gpus_per_region: float = 0, **search) -> list[RegionResult]:
    """Many regions, one Ray task each (`culign train --regions`); one RegionResult per region, failures included.
    Raises FanoutError when Ray is missing or the cluster cannot be reached."""
    survey = Survey.load()
    settings = TrainSettings(search=SearchConfig(**search), split=_split(survey, presentations, split))
    root = str(registry or DEFAULT_REGISTRY)
    root = root if "://" in root else str(Path(root).resolve())
    jobs = [RegionJob(_target(t), settings, root, model, None, None, (), checkpoint_dir, resume,
                      max(1, int(cpus_per_region))) for t in targets]
    return fan_out(jobs, ray_address=ray_address, cpus_per_region=cpus_per_region, gpus_per_region=gpus_per_region)


__all__ = [
    "load_model", "region", "custom_target", "evaluate", "load_adapter", "check_validity", "train", "train_regions",
    "open_registry", "ValidityReport", "InvalidModelError",
    "EvalResult", "TrainResult", "RegionResult", "Evaluation", "Comparison", "AdapterInfo", "LoadedAdapter",
    "Split", "Target", "Runtime",
    "ModelLoadError", "UnknownRegionError", "SurveyDataError", "RegistryError", "RegistryUnavailable",
    "AdapterNotFound", "AdapterCorrupt", "AdapterIncompatible", "FanoutError",
]
