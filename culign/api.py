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

from . import defaults, trainer
from .defaults import DEFAULT_REGISTRY  # noqa: F401  (public: where train saves by default)
from .evaluation import Comparison, Evaluation, Evaluator, Respondent
from .fanout import FanoutError, RegionJob, RegionResult, fan_out
from .fidelity import PrecisionRefused, choose as choose_precision
from .model import ModelLoadError, Runtime
from .optimize import SearchConfig
from .progress import bar as _bar
from .registry import (AdapterCorrupt, AdapterIncompatible, AdapterInfo, AdapterNotFound, AdapterRegistry,
                       LoadedAdapter, RegistryError, RegistryUnavailable, open_registry)
from .survey import Split, Survey, SurveyDataError
from .targets import Target, UnknownRegionError, parse_custom, resolve
from .trainer import TrainSettings
from .validity import InvalidModelError, ValidityReport
from .verdict import Verdict


def load_model(model: str | None = None, *, device: str | None = None, dtype: str | None = None) -> Runtime:
    """A model for scoring: an HF hub id from the local cache or a local folder; None: $CULIGN_MODEL where set, else
    the embedded SmolLM2-135M-Instruct (the CLI's ``--model`` default, resolved by :func:`culign.defaults.resolve`);
    float32 unless ``dtype`` (else $CULIGN_DTYPE) says otherwise. Raises ModelLoadError."""
    d = defaults.resolve(model=model, device=device, dtype=dtype)
    return Runtime.load(d.model, device=d.device, dtype=d.dtype, scoring=True)


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


def _registry(registry):
    """A registry object as given, else the one at that folder or URL (default: $CULIGN_ADAPTERS, else
    runs/adapters)."""
    if isinstance(registry, AdapterRegistry):
        return registry
    return open_registry(defaults.resolve(registry=registry).registry)


def make_split(readout: str | None = None, *, presentations: Sequence[str] = (), train: Sequence[str] = (),
               heldout: Sequence[str] = (), validation: Sequence[str] | None = None,
               wording_files: Sequence[str | Path] = ()) -> Split:
    """The split a run scores on, as the CLI's split options give it: ``presentations`` alone (names or patterns,
    no held-out), or ``readout``'s default split with the training, held-out and validation presentations
    overridden where given (``validation=()``: none). ``readout`` None: the one the named presentations are
    written for, else digit. Raises ValueError for an unknown name or a split that trains on what it holds
    out."""
    _one_source(presentations, None, train, heldout, validation)
    survey = Survey.load(wording_files=wording_files)
    readout = _readout_of(survey, readout, presentations or train) or "digit"
    return _chosen_split(survey, readout, presentations, None, train, heldout, validation)


def _readout_of(survey: Survey, readout: str | None, names: Sequence[str]) -> str | None:
    """The read-out asked for, else the one the first named presentation (or pattern) is written for, else None."""
    if readout is not None or not names:
        return readout
    return survey.readout_of(survey.expand(names)[0])


def _one_source(presentations, split, train, heldout, validation) -> None:
    """A split comes from one place: a Split, presentations alone, or overrides of the default split."""
    if split is not None and (presentations or train or heldout or validation is not None):
        raise ValueError("give presentations or a split, not both")
    if presentations and (train or heldout or validation):
        raise ValueError("give presentations or training/held-out/validation presentations, not both")


def _chosen_split(survey: Survey, readout: str, presentations, split, train, heldout, validation) -> Split:
    _one_source(presentations, split, train, heldout, validation)
    if split is not None:
        return split
    if presentations:
        return Split(tuple(survey.expand(presentations, readout)))
    return survey.split(train, heldout, validation, readout=readout)


@dataclass
class EvalResult:
    """Rows (naive, persona, adapters) scored on every presentation of a split, against one target."""
    comparison: Comparison
    model: str
    dtype: str
    readout: str = "digit"
    validity: dict[str, ValidityReport] = field(default_factory=dict, repr=False)  # when asked for

    @property
    def rows(self) -> list[Evaluation]:
        return list(self.comparison.rows)

    @property
    def split(self) -> Split:
        return self.comparison.split

    def row(self, label: str) -> Evaluation:
        for r in self.comparison.rows:
            if r.label == label:
                return r
        raise KeyError(f"no row {label!r}; rows: {[r.label for r in self.comparison.rows]}")

    def to_dict(self) -> dict:
        return {**self.comparison.to_dict(), "model": self.model, "dtype": self.dtype, "readout": self.readout,
                "validity": {r: v.summary() for r, v in self.validity.items()}}

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


def evaluate(target: str | Target, *, model: str | Runtime | None = None, adapters: Sequence[str | Path] = (),
             persona: bool = False, presentations: Sequence[str] = (), split: Split | None = None,
             train: Sequence[str] = (), heldout: Sequence[str] = (), validation: Sequence[str] | None = None,
             readout: str | None = None, registry=None, wording_files: Sequence[str | Path] = (),
             validity: bool = False, progress: bool = False) -> EvalResult:
    """Score the naive model, the persona baseline (``persona=True``) and adapters (``"US@2"`` in ``registry``,
    adapter folders, or :func:`load_adapter`'s results) on the VSM 2013 survey, as `culign eval` does.

    ``readout``: ``"digit"`` (the option digit's probability) or ``"label"`` (each option's label text as the
    continuation; its own templates); default: the first adapter's, else the one the named presentations are
    written for, else digit. The split: ``split``, or
    ``presentations`` alone, or the read-out's default split (digit: 9 training, 6 validation, 16 held-out) with
    ``train`` / ``heldout`` / ``validation`` overriding its parts; with adapters and none of these, the split the
    first adapter was trained on. ``validity=True`` adds the model's validity check for the read-out (cached)."""
    _one_source(presentations, split, train, heldout, validation)
    tgt, rt = _target(target), _model(model)
    survey = Survey.load(wording_files=wording_files)
    loaded = [a if isinstance(a, LoadedAdapter) else load_adapter(a, rt, registry) for a in adapters]
    trained_with = (loaded[0].provenance.get("readout") or "digit") if loaded else None
    readout = (readout or trained_with or _readout_of(survey, None, (split.train if split is not None else ())
                                                      or presentations or train) or "digit")
    if (loaded and readout == trained_with and "split" in loaded[0].provenance and split is None
            and not (presentations or train or heldout or validation is not None)):
        split = Split.from_dict(loaded[0].provenance["split"])
    sp = _chosen_split(survey, readout, presentations, split, train, heldout, validation)
    evaluator = Evaluator(rt, survey, tgt, sp)
    respondents = [Respondent.naive()] + ([Respondent.with_persona(tgt.display_name)] if persona else [])
    respondents += [Respondent(a.info.ref, a.prompt) for a in loaded]
    bar = _bar(len(respondents) * len(sp.all_names), "scoring", "presentation", progress)
    rows = []
    for r in respondents:
        bar.set_postfix_str(r.label)
        rows.append(evaluator.evaluate(r, on_presentation=lambda _n: bar.update()))
    bar.close()
    for row, a in zip(rows[len(rows) - len(loaded):], loaded):
        row.extra["adapter"] = str(a.info.path)
    checks = check_validity(rt, readouts=[readout], progress=progress) if validity else {}
    return EvalResult(Comparison(tgt, sp, rows), rt.name, str(rt.dtype).replace("torch.", ""), readout, checks)


def load_adapter(ref: str | Path, model: Runtime, registry=None) -> LoadedAdapter:
    """``"US"``, ``"US@2"`` in ``registry`` (default: $CULIGN_ADAPTERS, else runs/adapters), or an adapter folder; checked against the
    model (width and fingerprint). Raises AdapterNotFound / AdapterCorrupt / AdapterIncompatible, and ValueError
    for a malformed reference."""
    from .regions import parse_region

    path = Path(ref)
    if path.is_dir():
        reg, name, version = open_registry(path.parent.parent), path.parent.name, int(path.name)
    else:
        spec = parse_region(str(ref), "adapter")
        reg, name, version = _registry(registry), spec.name, spec.version
    return reg.load(name, version, hidden_size=model.hidden_size, base_fingerprint=model.fingerprint)


def check_validity(model: str | Runtime | None = None, *, readouts: Sequence[str] = ("digit", "label"),
                   use_cache: bool = True, progress: bool = False) -> dict[str, ValidityReport]:
    """`culign validity`: per read-out, does the model's answer follow meaning and culture (order slope, agreement
    across wordings, persona spread against the noise band, Kendall's tau with Hofstede, option mass, verdict)?
    Cached per model, read-out and culign version; only what the cache lacks is measured (one progress bar)."""
    from . import validity as checks

    rt = _model(model)
    out = {r: checks.cached(rt, r) if use_cache else None for r in readouts}
    todo = [r for r, hit in out.items() if hit is None]
    if todo:
        survey = Survey.load()
        bar = _bar(sum(checks.steps(r) for r in todo), f"validity check ({', '.join(todo)})", "presentation",
                   progress)
        for r in todo:
            out[r] = checks.check(rt, survey, r, use_cache=False, on_step=lambda _n: bar.update())
        bar.close()
    return out


@dataclass
class TrainResult:
    adapter: AdapterInfo
    report: dict = field(repr=False)
    comparison: Comparison = field(repr=False)
    table_text: str = field(default="", repr=False)
    verdict: Verdict | None = None  # the post-training verdict (culign.verdict), also in report["verdict"]

    def to_dict(self) -> dict:
        return {"adapter": self.adapter.to_dict(), "report": self.report}

    def table(self) -> str:
        from .report import format_table

        return self.table_text or format_table(self.comparison)


def _gate(rt: Runtime, survey: Survey, readout: str | None, force_invalid: bool, progress: bool, echo,
          presentations, split, train, heldout, validation, order_balanced: bool | None = None) -> tuple[Split, dict]:
    """The validity check before training (culign.validity): the read-out that passes, else one that follows meaning
    with no cultural signal (with a warning: only the post-training verdict can call it an alignment), else the
    forced one; its split (both scale orders where ``order_balanced`` says so; None: where that read-out follows
    meaning and the split is the default one), and how the run was gated, for the trainer's report and provenance.
    Raises InvalidModelError (validity.choose_readout)."""
    from .survey import READOUTS, both_orders
    from .validity import SLOPE_MIN, choose_readout

    _one_source(presentations, split, train, heldout, validation)
    readout = _readout_of(survey, readout, (split.train if split is not None else ()) or presentations or train)
    if readout is not None:
        _chosen_split(survey, readout, presentations, split, train, heldout, validation)  # fails before the check
    reports = check_validity(rt, readouts=[readout] if readout else list(READOUTS), progress=progress)
    chosen, forced = choose_readout(reports, readout, force_invalid)
    from .report import format_validity

    summaries = {r: v.summary() for r, v in reports.items()}
    echo(format_validity(summaries))
    if forced:
        echo(f"force_invalid: training on the {chosen} read-out although it {reports[chosen].verdict}; the adapter "
             "is marked as trained on an invalid model")
    sp = _chosen_split(survey, chosen, presentations, split, train, heldout, validation)
    default = split is None and not (presentations or train or heldout or validation is not None)
    balanced = (reports[chosen].follows_meaning and default) if order_balanced is None else bool(order_balanced)
    if balanced:
        sp = both_orders(sp)  # drops from every family what training now sees: nothing held out is trained on
        why = "follows meaning" if order_balanced is None else "was asked for both orders"
        echo(f"the {chosen} read-out {why}: training on both scale orders ({len(sp.train)} presentations; "
             f"held-out families {', '.join(sp.heldout) or 'none'})")
    if not forced and not reports[chosen].passes:  # follows meaning, no culture shown: trainable (validity.trainable)
        echo(f"warning: the {chosen} read-out follows meaning (order slope {reports[chosen].order_slope:+.2f} >= "
             f"{SLOPE_MIN}) but shows no cultural signal ({'; '.join(reports[chosen].reasons)}); training on it "
             f"{'order-balanced' if balanced else 'in one scale order (your split, or --no-order-balanced)'}. "
             "Only the post-training verdict can call the result an alignment (docs/method.md, \"The post-training "
             "verdict\").")
    return sp, dict(readout=chosen, validity=summaries, forced_invalid=forced, order_balanced=balanced)


def _search(search: SearchConfig | None, fields: dict) -> SearchConfig:
    if search is not None and fields:
        raise ValueError(f"give search= or SearchConfig's fields ({', '.join(fields)}), not both")
    return search if search is not None else SearchConfig(**fields)


def _quiet(_message: str) -> None:
    pass


def train(target: str | Target, *, model: str | Runtime | None = None, registry=None,
          presentations: Sequence[str] = (), split: Split | None = None, train: Sequence[str] = (),
          heldout: Sequence[str] = (), validation: Sequence[str] | None = None,
          wording_files: Sequence[str | Path] = (), checkpoint_dir: str | Path | None = None, resume: bool = False,
          progress: bool = False, echo=None, readout: str | None = None, force_invalid: bool = False,
          order_balanced: bool | None = None, search: SearchConfig | None = None, search_precision: str | None = None,
          force_search_precision: bool = False, **search_fields) -> TrainResult:
    """Train one region's soft prompt (`culign train --region`) and publish it to ``registry`` (a folder, an
    ``s3://`` URL or a registry object; default: $CULIGN_ADAPTERS, else runs/adapters). The search: ``search=SearchConfig(...)`` or its
    fields as keywords (budget, popsize, tokens, dim, seed, optimizer, max_seconds, ...). The split: as in
    :func:`evaluate`.

    The model's validity check runs first (from the cache when there), for ``readout`` or, when None, for every
    read-out: training uses the one that passes, else one that follows meaning without a cultural signal (warned:
    ``result.verdict``, the post-training verdict, says whether it is an alignment). A read-out that follows
    position raises InvalidModelError unless ``force_invalid``, and the adapter is then marked.
    ``order_balanced``: train on every presentation in both scale orders (True), never (False), or where the
    read-out follows meaning and the split is the default (None);
    the ``order:`` held-out family then goes, the others keep their wordings and templates apart from training.
    ``echo`` receives the run's messages (default: printed when ``progress``). Raises ValueError for bad settings,
    RegistryError when the registry refuses.

    ``search_precision``: what the search scores candidates in (None: $CULIGN_SEARCH_PRECISION, else ``auto``, the
    fastest precision that passes the fidelity check on this CPU; culign.fidelity). Everything reported is float32.
    A named precision that fails the check raises PrecisionRefused (a ValueError) unless ``force_search_precision``."""
    echo = echo or (print if progress else _quiet)
    tgt = _target(target)
    cfg = _search(search, search_fields)
    store = _registry(registry)
    rt = _model(model)
    survey = Survey.load(wording_files=wording_files)
    sp, gate = _gate(rt, survey, readout, force_invalid, progress, echo, presentations, split, train, heldout,
                     validation, order_balanced)
    settings = TrainSettings(search=cfg, split=sp, force_search_precision=force_search_precision,
                             search_precision=defaults.resolve(search_precision=search_precision).search_precision)
    outcome = trainer.train(rt, survey, tgt, settings, store,
                     checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume,
                     progress=progress, echo=echo, **gate)
    return TrainResult(outcome.adapter, outcome.report, outcome.comparison, outcome.table, outcome.verdict)


def train_regions(targets: Sequence[str | Target], *, model: str | None = None, device: str | None = None,
                  dtype: str | None = None, registry: str | Path | None = None, presentations: Sequence[str] = (),
                  split: Split | None = None, train: Sequence[str] = (), heldout: Sequence[str] = (),
                  validation: Sequence[str] | None = None, wording_files: Sequence[str | Path] = (),
                  checkpoint_dir: str | Path | None = None, resume: bool = False, ray_address: str | None = None,
                  cpus_per_region: float = 1, gpus_per_region: float = 0, progress: bool = False, echo=None,
                  on_update=None, readout: str | None = None, force_invalid: bool = False,
                  order_balanced: bool | None = None, search: SearchConfig | None = None,
                  search_precision: str | None = None, force_search_precision: bool = False,
                  **search_fields) -> list[RegionResult]:
    """Many regions, one Ray task each (`culign train --regions`); one RegionResult per region, failures included.
    The validity check gates the run once, here, before the regions fan out (InvalidModelError as in
    :func:`train`); each task loads its own copy of ``model``. ``on_update(region, progress)``: live progress.
    Raises FanoutError when Ray is missing or the cluster cannot be reached. The search precision (as in
    :func:`train`) is decided once, here, on this machine's CPU, and every region's search uses it."""
    from .fanout import check_address

    echo = echo or (print if progress else _quiet)
    tgts = [_target(t) for t in targets]
    cfg = _search(search, search_fields)
    check_address(ray_address)  # before the model and the check: a bad address costs nothing
    where = defaults.resolve(model=model, registry=registry, device=device, dtype=dtype,
                             search_precision=search_precision)
    survey = Survey.load(wording_files=wording_files)
    rt = Runtime.load(where.model, device=where.device, dtype=where.dtype, scoring=True)
    sp, gate = _gate(rt, survey, readout, force_invalid, progress, echo, presentations, split, train, heldout,
                     validation, order_balanced)
    choice = choose_precision(rt, survey, where.search_precision, sp.train, cfg, force=force_search_precision,
                              progress=progress, echo=echo)
    del rt  # the tasks load their own
    settings = TrainSettings(search=cfg, split=sp, search_precision=choice)
    echo(f"training {len(tgts)} regions on Ray ({cpus_per_region:g} CPU, {gpus_per_region:g} GPU each): "
         + ", ".join(t.key for t in tgts))
    absolute = lambda p: p if "://" in str(p) else str(Path(p).resolve())  # noqa: E731  workers have other cwds
    jobs = [RegionJob(t, settings, absolute(where.registry), where.model, where.device, where.dtype,
                      tuple(map(absolute, wording_files)), None if checkpoint_dir is None else absolute(checkpoint_dir),
                      resume, max(1, int(cpus_per_region)), gate) for t in tgts]
    return fan_out(jobs, ray_address=ray_address, cpus_per_region=cpus_per_region, gpus_per_region=gpus_per_region,
                   on_update=on_update)


__all__ = [
    "load_model", "region", "custom_target", "make_split", "evaluate", "load_adapter", "check_validity", "train", "train_regions",
    "open_registry", "ValidityReport", "InvalidModelError", "Verdict",
    "EvalResult", "TrainResult", "RegionResult", "Evaluation", "Comparison", "AdapterInfo", "LoadedAdapter",
    "Split", "Target", "Runtime",
    "ModelLoadError", "UnknownRegionError", "SurveyDataError", "RegistryError", "RegistryUnavailable",
    "AdapterNotFound", "AdapterCorrupt", "AdapterIncompatible", "FanoutError", "PrecisionRefused",
]
