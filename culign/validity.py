"""Validity: does a model's survey answer follow what the options *mean*, and does it carry *culture*? Per read-out.

Before culign tunes a prompt to move a model's answers towards a culture, the answers must be able to carry one.
The check puts the bare model and a fixed panel of persona lines ("Answer as a typical person from X would.",
:data:`PANEL`: 8 countries far apart on every dimension) to the survey on a small grid of presentations: two
wordings x one template of the read-out x both scale orders. From the indices it measures

- **order slope**: the persona moves (against the bare model) on the reversed scale regressed on those on the
  ascending one (+1: the answers follow the labels; -1: they follow the option's position);
- **agreement**: the correlation between two wordings of how the panel's countries differ from one another (each
  country's indices minus the panel mean on that presentation: the shift every persona line makes alike is not
  culture);
- **spread**: the standard deviation of the indices across the panel's countries, against the bare model's own
  **noise band** (its standard deviation across the check's presentations: what a change of wording or order
  alone does);
- **tau**: Kendall's tau-b, across the panel, between each dimension's persona index and Hofstede's score;
- **option mass**: the probability the answers put on the options at all.

and gives one verdict per read-out (:data:`PASS`, :data:`POSITION` or :data:`NO_SIGNAL`) against thresholds fixed
below and justified in docs/method.md. A threshold is never tuned so that a model passes.

Results are cached per model (name and weights fingerprint), read-out, culign version and check settings under
``~/.cache/culign/validity``; a cache hit returns the stored report unchanged. Knows nothing of DE or HTTP.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import __version__
from .defaults import cache_root
from .model.hardware import cpu_capability
from .model.runtime import Runtime
from .scorer import SurveyScorer
from .survey import DIMENSIONS, READOUTS, Survey
from .targets import resolve

# The panel: Hofstede codes of 8 countries with all six scores, chosen (before any model was measured) so that every
# dimension spans most of Hofstede's range: PDI 31-93, IDV 20-91, MAS 5-95, UAI 29-95, LTO 26-88, IVR 20-78.
PANEL = ("USA", "CHI", "IND", "JPN", "SWE", "GER", "BRA", "RUS")
WORDINGS = ("vsm", "plain")  # agreement needs two wordings; both orders of each give the order slope
TEMPLATES = {"digit": "chat", "label": "label_chat"}

# Thresholds (docs/method.md, "Is the model's answer valid?", says why each is where it is). Changing one changes the check's
# cache key, so an old verdict is never read under new thresholds.
SLOPE_MIN = 0.5  # a move on the reversed scale keeps at least half its size in the direction the labels say
AGREEMENT_MIN = 0.5  # r >= 0.5: the countries' differences on one wording predict those on the other (Cohen: large)
SPREAD_MIN = 1.0  # the panel's countries at least as far apart as a change of presentation moves the bare model
TAU_MIN = 0.3  # mean over dims; one dim's tau over 8 countries has null sd 0.29, the mean of 6 about 0.12
CHECK_VERSION = 1  # bump when what is measured changes

PASS = "follows meaning and culture"
POSITION = "follows position"
NO_SIGNAL = "no cultural signal"

Indices = Mapping[str, Mapping[str, float]]  # presentation -> dimension -> index


class InvalidModelError(Exception):
    """No read-out of this model may be trained: each follows position (and training was not forced, see
    :func:`trainable`): ``reports`` says why."""

    def __init__(self, reports: Mapping[str, "ValidityReport"], requested: str | None = None):
        self.reports = dict(reports)
        which = f"the {requested} read-out" if requested else "no read-out"
        verdicts = "; ".join(f"{r}: {v.verdict}" for r, v in self.reports.items())
        super().__init__(f"{which} of {next(iter(self.reports.values())).model} passes the validity check "
                         f"({verdicts})" if requested is None else
                         f"{which} of {self.reports[requested].model} does not pass the validity check "
                         f"({self.reports[requested].verdict})")


# ---------------------------------------------------------------------------------------------------- the statistics
def _twin(name: str) -> str | None:
    return name[: -len("asc")] + "desc" if name.endswith("/asc") else None


def order_slope(personas: Mapping[str, Indices], naive: Indices) -> float | None:
    """Least-squares slope through 0 of the persona moves (persona minus naive, per dimension) on each reversed
    presentation ``w/t/desc`` on those on its ascending twin ``w/t/asc``, pooled over personas and dimensions.
    +1: a persona moves what the answers mean; -1: it moves which position is picked. None without such pairs."""
    asc, desc = [], []
    for rows in personas.values():
        for name in rows:
            twin = _twin(name)
            if twin is None or twin not in rows or name not in naive or twin not in naive:
                continue
            for d in DIMENSIONS:
                asc.append(rows[name][d] - naive[name][d])
                desc.append(rows[twin][d] - naive[twin][d])
    norm = sum(a * a for a in asc)
    return sum(a * b for a, b in zip(asc, desc)) / norm if norm > 1e-12 else None


def _centred(personas: Mapping[str, Indices], name: str) -> list[float]:
    """Each persona's indices on ``name`` minus the panel's mean there, persona-major, dimension-minor."""
    mean = {d: statistics.fmean(rows[name][d] for rows in personas.values()) for d in DIMENSIONS}
    return [rows[name][d] - mean[d] for rows in personas.values() for d in DIMENSIONS]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) != len(y) or len(x) < 2:
        return None
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 1e-12 and syy > 1e-12 else None


def agreement(personas: Mapping[str, Indices]) -> float | None:
    """Do the panel's countries differ the same way on two wordings? Pearson's r between the centred persona
    indices (:func:`_centred`) on ``w1/t/o`` and on ``w2/t/o``, pooled over every template and order two wordings
    share; with more than two wordings, the mean over wording pairs. None without two wordings."""
    names = sorted(next(iter(personas.values())))
    by_rest: dict[str, list[str]] = {}
    for n in names:
        w, rest = n.split("/", 1)
        by_rest.setdefault(rest, []).append(w)
    wordings = sorted({n.split("/", 1)[0] for n in names})
    rs = []
    for w1, w2 in itertools.combinations(wordings, 2):
        x, y = [], []
        for rest, ws in by_rest.items():
            if w1 in ws and w2 in ws:
                x += _centred(personas, f"{w1}/{rest}")
                y += _centred(personas, f"{w2}/{rest}")
        r = pearson(x, y)
        if r is not None:
            rs.append(r)
    return statistics.fmean(rs) if rs else None


def spread(personas: Mapping[str, Indices]) -> dict[str, float]:
    """Per dimension: the standard deviation of the indices across the panel, on each presentation, averaged over
    the presentations."""
    names = list(next(iter(personas.values())))
    return {d: statistics.fmean(statistics.pstdev([rows[n][d] for rows in personas.values()]) for n in names)
            for d in DIMENSIONS}


def noise_band(naive: Indices) -> dict[str, float]:
    """Per dimension: the bare model's standard deviation across the presentations (as Comparison.noise_band)."""
    return {d: statistics.pstdev([ind[d] for ind in naive.values()]) for d in DIMENSIONS}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties counted as neither concordant nor discordant, the denominator corrected for them)."""
    n = len(x)
    if n != len(y) or n < 2:
        return None
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(n), 2):
        a, b = x[i] - x[j], y[i] - y[j]
        if a == 0 and b == 0:
            continue
        if a == 0:
            tx += 1
        elif b == 0:
            ty += 1
        elif (a > 0) == (b > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else None


def tau_by_dimension(personas: Mapping[str, Indices], targets: Mapping[str, Mapping[str, float]]
                     ) -> dict[str, float | None]:
    """Per dimension, Kendall's tau between the persona's index (mean over presentations) and Hofstede's score,
    across the panel's countries that have that score."""
    out = {}
    for d in DIMENSIONS:
        xs, ys = [], []
        for country, rows in personas.items():
            if targets.get(country, {}).get(d) is not None:
                xs.append(statistics.fmean(ind[d] for ind in rows.values()))
                ys.append(float(targets[country][d]))
        out[d] = kendall_tau(xs, ys)
    return out


def judge(slope: float | None, agree: float | None, spread_ratio: float | None, tau_mean: float | None
          ) -> tuple[str, list[str]]:
    """The verdict and, for each failed threshold, why. Order first: answers that follow the position cannot carry
    a culture whatever the rest says; then every cultural measure must pass."""
    fmt = lambda v: "n/a" if v is None else f"{v:+.2f}"  # noqa: E731
    if slope is None or slope < SLOPE_MIN:
        return POSITION, [f"order slope {fmt(slope)} < {SLOPE_MIN}: reversing the scale does not keep a move's "
                          "meaning"]
    reasons = []
    if agree is None or agree < AGREEMENT_MIN:
        reasons.append(f"agreement across wordings {fmt(agree)} < {AGREEMENT_MIN}")
    if spread_ratio is None or spread_ratio < SPREAD_MIN:
        reasons.append(f"persona spread {'n/a' if spread_ratio is None else f'{spread_ratio:.2f}'} x the noise band "
                       f"< {SPREAD_MIN}")
    if tau_mean is None or tau_mean < TAU_MIN:
        reasons.append(f"Kendall's tau with Hofstede {fmt(tau_mean)} < {TAU_MIN}")
    return (NO_SIGNAL, reasons) if reasons else (PASS, [])


# ---------------------------------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class ValidityReport:
    """One model, one read-out: the numbers, the verdict and what was measured."""
    model: str
    fingerprint: str
    readout: str
    culign_version: str
    presentations: tuple[str, ...]
    panel: tuple[str, ...]  # country names, as the persona lines say them
    order_slope: float | None
    agreement: float | None
    spread: Mapping[str, float]
    noise_band: Mapping[str, float]
    tau: Mapping[str, float | None]
    option_mass: float  # the bare model's mean probability on the options over the check's presentations
    option_mass_min: float  # the lowest of any respondent on any presentation
    verdict: str
    reasons: tuple[str, ...]
    wall_time_s: float
    environment: Mapping[str, str] = field(default_factory=dict)
    indices: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict, repr=False)
    from_cache: bool = field(default=False, compare=False)

    @property
    def spread_mean(self) -> float:
        return statistics.fmean(self.spread.values())

    @property
    def noise_band_mean(self) -> float:
        return statistics.fmean(self.noise_band.values())

    @property
    def spread_ratio(self) -> float | None:
        band = self.noise_band_mean
        return self.spread_mean / band if band > 1e-12 else None

    @property
    def tau_mean(self) -> float | None:
        vals = [v for v in self.tau.values() if v is not None]
        return statistics.fmean(vals) if vals else None

    @property
    def passes(self) -> bool:
        return self.verdict == PASS

    @property
    def follows_meaning(self) -> bool:
        """The order slope passes: training on both orders then teaches meaning, not position."""
        return self.order_slope is not None and self.order_slope >= SLOPE_MIN

    def summary(self) -> dict:
        """The numbers a report or an adapter's provenance keeps (no per-presentation indices)."""
        return {"readout": self.readout, "verdict": self.verdict, "passes": self.passes,
                "order_slope": self.order_slope, "agreement": self.agreement, "spread_mean": self.spread_mean,
                "noise_band_mean": self.noise_band_mean, "spread_ratio": self.spread_ratio, "tau_mean": self.tau_mean,
                "tau": dict(self.tau), "option_mass": self.option_mass, "reasons": list(self.reasons),
                "model": self.model, "culign_version": self.culign_version}

    def to_dict(self) -> dict:
        return {"model": self.model, "fingerprint": self.fingerprint, "readout": self.readout,
                "culign_version": self.culign_version, "presentations": list(self.presentations),
                "panel": list(self.panel), "order_slope": self.order_slope, "agreement": self.agreement,
                "spread": dict(self.spread), "noise_band": dict(self.noise_band), "tau": dict(self.tau),
                "spread_mean": self.spread_mean, "noise_band_mean": self.noise_band_mean,
                "spread_ratio": self.spread_ratio, "tau_mean": self.tau_mean,
                "option_mass": self.option_mass, "option_mass_min": self.option_mass_min, "verdict": self.verdict,
                "passes": self.passes, "reasons": list(self.reasons), "wall_time_s": self.wall_time_s,
                "environment": dict(self.environment), "thresholds": thresholds(),
                "indices": {k: {n: dict(v) for n, v in rows.items()} for k, rows in self.indices.items()}}

    @classmethod
    def from_dict(cls, d: Mapping, from_cache: bool = False) -> "ValidityReport":
        return cls(d["model"], d["fingerprint"], d["readout"], d["culign_version"], tuple(d["presentations"]),
                   tuple(d["panel"]), d["order_slope"], d["agreement"], dict(d["spread"]), dict(d["noise_band"]),
                   dict(d["tau"]), d["option_mass"], d["option_mass_min"], d["verdict"], tuple(d["reasons"]),
                   d["wall_time_s"], dict(d.get("environment", {})),
                   {k: {n: dict(v) for n, v in rows.items()} for k, rows in d.get("indices", {}).items()}, from_cache)


def thresholds() -> dict:
    return {"order_slope": SLOPE_MIN, "agreement": AGREEMENT_MIN, "spread_ratio": SPREAD_MIN, "tau_mean": TAU_MIN}


def build_report(model: str, fingerprint: str, readout: str, naive: Indices, personas: Mapping[str, Indices],
                 targets: Mapping[str, Mapping[str, float]], masses: Mapping[str, Mapping[str, float]],
                 wall_time_s: float = 0.0, environment: Mapping[str, str] | None = None) -> ValidityReport:
    """The report from indices alone (``naive``: presentation -> dim -> index; ``personas``: country -> the same;
    ``masses``: respondent -> presentation -> option mass): everything but the scoring, so tests can hand it rows."""
    slope, agree = order_slope(personas, naive), agreement(personas)
    spr, band, tau = spread(personas), noise_band(naive), tau_by_dimension(personas, targets)
    band_mean = statistics.fmean(band.values())
    ratio = statistics.fmean(spr.values()) / band_mean if band_mean > 1e-12 else None
    taus = [v for v in tau.values() if v is not None]
    verdict, reasons = judge(slope, agree, ratio, statistics.fmean(taus) if taus else None)
    naive_mass = masses.get("naive", {})
    all_mass = [m for rows in masses.values() for m in rows.values()]
    indices = {"naive": {n: dict(v) for n, v in naive.items()},
               **{c: {n: dict(v) for n, v in rows.items()} for c, rows in personas.items()}}
    return ValidityReport(model, fingerprint, readout, __version__, tuple(naive), tuple(personas), slope, agree, spr,
                          band, tau, statistics.fmean(naive_mass.values()) if naive_mass else float("nan"),
                          min(all_mass) if all_mass else float("nan"), verdict, tuple(reasons), wall_time_s,
                          dict(environment or {}), indices)


# ---------------------------------------------------------------------------------------------------- running it
def presentations(readout: str, wordings: Sequence[str] = WORDINGS) -> list[str]:
    if readout not in READOUTS:
        raise ValueError(f"unknown read-out {readout!r}; choose from {', '.join(READOUTS)}")
    return [f"{w}/{TEMPLATES[readout]}/{o}" for w in wordings for o in ("asc", "desc")]


def steps(readout: str, panel: Sequence[str] = PANEL, wordings: Sequence[str] = WORDINGS) -> int:
    """Presentation-evaluations one check costs (the bare model and each persona on each presentation)."""
    return (1 + len(panel)) * len(presentations(readout, wordings))


def _cache_file(rt: Runtime, readout: str, panel: Sequence[str], wordings: Sequence[str], cache_dir: Path) -> Path:
    key = json.dumps([CHECK_VERSION, __version__, rt.name, rt.fingerprint, readout, list(panel), list(wordings),
                      str(rt.dtype), rt.fp32_answer, thresholds()])
    return cache_dir / f"{readout}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def default_cache_dir() -> Path:
    return cache_root() / "validity"


def cached(rt: Runtime, readout: str, panel: Sequence[str] = PANEL, wordings: Sequence[str] = WORDINGS,
           cache_dir: Path | None = None) -> ValidityReport | None:
    path = _cache_file(rt, readout, panel, wordings, cache_dir or default_cache_dir())
    try:
        return ValidityReport.from_dict(json.loads(path.read_text()), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(rt: Runtime, survey: Survey, readout: str, *, panel: Sequence[str] = PANEL,
          wordings: Sequence[str] = WORDINGS, cache_dir: Path | None = None, use_cache: bool = True,
          on_step: Callable[[str], None] | None = None) -> ValidityReport:
    """Run the check for one read-out (or return the cached report: the same numbers, ``from_cache`` set).

    ``on_step`` is called after each presentation-evaluation (:func:`steps` of them), for a progress bar.
    """
    cache_dir = cache_dir or default_cache_dir()
    if use_cache:
        hit = cached(rt, readout, panel, wordings, cache_dir)
        if hit is not None:
            return hit
    names = presentations(readout, wordings)
    t0 = time.perf_counter()
    targets = {c: resolve(c) for c in panel}
    naive_ind, personas, masses = {}, {}, {}
    for who in (None, *panel):
        label = "naive" if who is None else targets[who].display_name
        scorer = SurveyScorer(rt, survey, names, persona=None if who is None else targets[who].display_name)
        rows, mass = {}, {}
        for n in names:
            a = scorer.answers(None, [n])[n]
            rows[n] = survey.indices(dict(zip(survey.item_ids, a.expected[0].tolist())))
            mass[n] = float(a.mass[0].mean())
            if on_step:
                on_step(f"{label} {n}")
        masses[label] = mass
        if who is None:
            naive_ind = rows
        else:
            personas[label] = rows
    scores = {targets[c].display_name: dict(targets[c].scores) for c in panel}
    env = {"device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", ""), "torch": torch.__version__}
    if rt.device.type == "cpu":
        env["cpu"] = cpu_capability()
    report = build_report(rt.name, rt.fingerprint, readout, naive_ind, personas, scores, masses,
                          time.perf_counter() - t0, env)
    # what is returned is what is stored, read back: a later cache hit is bit-identical to this report
    data = json.loads(json.dumps(report.to_dict()))
    path = _cache_file(rt, readout, panel, wordings, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))  # key order kept: a hit reads back the same
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
    return ValidityReport.from_dict(data)


def trainable(report: ValidityReport) -> bool:
    """The gate, by what it can know before training: a read-out whose answers follow meaning (order slope >=
    SLOPE_MIN) may be trained, culture shown or not; one that follows position may not. A persona line is not the
    only way to show a culture, and DE may find what a one-line persona cannot; but a prompt's gain on a
    position-following read-out can never carry meaning. Only the post-training verdict (culign.verdict) can call
    what a "no cultural signal" read-out gives an alignment."""
    return report.follows_meaning  # judge() says POSITION exactly when this is False


def choose_readout(reports: Mapping[str, ValidityReport], requested: str | None = None, force: bool = False
                   ) -> tuple[str, bool]:
    """The read-out training uses and whether it is forced (trained although it follows position).

    ``requested``: that read-out, if :func:`trainable` (or ``force``). None: the first read-out that passes, in
    :data:`READOUTS` order, else the first that is trainable (follows meaning, no cultural signal shown: the caller
    warns and trains it order-balanced), else with ``force`` the first. ``reports[r].passes`` tells the two
    unforced cases apart. Raises InvalidModelError when nothing is trainable and ``force`` is off.
    """
    if requested is not None:
        if trainable(reports[requested]):
            return requested, False
        if force:
            return requested, True
        raise InvalidModelError({requested: reports[requested]}, requested)
    ordered = [r for r in READOUTS if r in reports]
    for ok in (lambda v: v.passes, trainable):
        for r in ordered:
            if ok(reports[r]):
                return r, False
    if force:
        return ordered[0], True
    raise InvalidModelError(reports)
