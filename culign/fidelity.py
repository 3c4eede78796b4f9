"""Which precision the search scores in: measured per model and CPU, never assumed (``--search-precision``).

DE only compares candidates, so a faster precision (:mod:`culign.model.precision`) may score them if it ranks them
as float32 does. The **fidelity check** scores :data:`CANDIDATES` random candidates of the search space (seeded)
on the run's first :data:`PRESENTATIONS` training presentation(s) in float32 and in the precision, and computes
the training objective (mean of the mass-guarded L1 losses) of each against every target of the validity panel
(8 countries far apart, :data:`culign.validity.PANEL`): the ranking is then the model's, not one region's, and one
check serves every region. It reports

- **Spearman**: the rank correlation of the candidates' losses, the worst over the panel (passes at >= 0.95);
- **max index diff**: the largest difference of any index, any candidate, between the two precisions;
- **same best**: for how many of the panel's targets the best candidate is the same;
- the **rate** of each (presentation-evaluations per second, which is DE's candidates per second at the default
  ``subset=1``).

One presentation, not the nine a run trains on: a generation compares its candidates on one presentation
(``subset=1``), so this is the comparison DE makes, and it costs 64 presentation-evaluations in float32 plus 64 per
precision checked (4 % + a share of that per precision of the default 1,600-candidate search), once per model and
CPU: results are cached under ``~/.cache/culign/fidelity``, keyed by the model's fingerprint, the CPU (ISA level,
flags, threads), the precision, the presentations, the sample and culign's version.

``auto`` first times one of the model's linear layers in each precision (:func:`~culign.model.precision.
linear_rate`, about a second): one below :data:`PROBE_MIN` x float32's rate is not checked (bf16 emulated
on an AVX2 CPU runs ~65x slower; checking it would take longer than the search). Of the rest, it takes the one with the
highest measured rate that passes and is at least :data:`MIN_SPEEDUP` x float32's; float32 when none is.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import __version__
from .defaults import cache_root
from .evaluation import MassGuard, Robust, presentation_scores
from .model import precision as precisions
from .model.hardware import cpu_capability, cpu_flags
from .model.runtime import Runtime
from .optimize import Init, PromptSpace, SearchConfig, initial_prompt
from .progress import bar as progress_bar
from .scorer import Answers, SurveyScorer
from .survey import DEFAULT_CONSTANT, Survey, persona_line
from .targets import resolve
from .validity import PANEL

CANDIDATES = 64
PRESENTATIONS = 1
SPEARMAN_MIN = 0.95  # the issue's goal; a threshold is never tuned so that a precision passes
MIN_SPEEDUP = 1.1  # below this a faster precision is not worth its rounding
PROBE_MIN = 0.5  # linear-layer rate vs float32 below which a precision is not even checked: catches emulation
# (bf16 on AVX2: ~0.02x), not a neighbour's burst on a shared CPU (the check's measured rate decides the rest)
SAMPLE_SEED = 0  # the check's own: the sample is the same whatever the run's seed, so its cache serves every run
CHECK_VERSION = 1  # bump when what is measured changes


class PrecisionRefused(ValueError):
    """A search precision asked for by name failed the fidelity check (and was not forced), or cannot run here."""


@dataclass
class Scored:
    """One precision's answers to the check's sample: per presentation, expected answers and option masses
    ([candidate][item]); what the cache keeps."""
    precision: str
    presentations: list[str]
    expected: dict[str, list[list[float]]]
    mass: dict[str, list[list[float]]]
    seconds: float

    @property
    def rate(self) -> float:
        """Presentation-evaluations per second."""
        n = sum(len(v) for v in self.expected.values())
        return n / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Fidelity:
    precision: str
    spearman: float  # worst over the panel's targets
    max_index_diff: float
    same_best: int  # panel targets whose best candidate is the same
    targets: int
    rate: float  # presentation-evaluations per second in this precision
    reference_rate: float  # the same in float32, measured in the same check
    candidates: int
    presentations: list[str]
    from_cache: bool = False

    @property
    def passes(self) -> bool:
        return not math.isnan(self.spearman) and self.spearman >= SPEARMAN_MIN

    @property
    def speedup(self) -> float:
        return self.rate / self.reference_rate

    def to_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes, "speedup": self.speedup, "spearman_min": SPEARMAN_MIN}

    def line(self) -> str:
        return (f"{self.precision:<6}{self.rate:>8.2f}{self.speedup:>8.2f}x{self.spearman:>10.3f}"
                f"{self.max_index_diff:>10.1f}{f'{self.same_best}/{self.targets}':>11}  "
                f"{'passes' if self.passes else f'fails (Spearman < {SPEARMAN_MIN})'}")


HEADER = f"{'':<6}{'evals/s':>8}{'vs fp32':>9}{'Spearman':>10}{'max diff':>10}{'same best':>11}"


@dataclass
class Choice:
    """The precision a search runs in, and why (into the report and the adapter's provenance). Picklable: the
    fan-out decides once and hands it to every region."""
    name: str
    requested: str
    reason: str
    checks: dict[str, dict] = field(default_factory=dict)  # precision -> Fidelity.to_dict(), or {"skipped": why}

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- the sample
def sample(rt: Runtime, cfg: SearchConfig, n: int) -> torch.Tensor:
    """``n`` candidate prompts [n, tokens, hidden] of the run's search space (its tokens, dim, bound, scale) around
    a persona start (the panel's first country), z uniform in the box, all from :data:`SAMPLE_SEED`."""
    space_cfg = SearchConfig(tokens=cfg.tokens, dim=cfg.dim, bound=cfg.bound, scale=cfg.scale, seed=SAMPLE_SEED,
                             init=Init.PERSONA)
    p0 = initial_prompt(rt, space_cfg, persona_line(resolve(PANEL[0]).display_name))
    space = PromptSpace(p0, space_cfg, float(rt.embedding_matrix.detach().float().std()))
    z = np.random.default_rng(SAMPLE_SEED).uniform(-cfg.bound, cfg.bound, size=(n, cfg.dim))
    return space.prompts(z)


def check_presentations(train: Sequence[str], k: int = PRESENTATIONS) -> list[str]:
    """The training presentations the check scores on: ``k`` spread over the list (the first one for k = 1)."""
    train = list(train)
    step = max(1, len(train) // k)
    return train[::step][:k]


def _key(rt: Runtime, precision: str, presentations: Sequence[str], cfg: SearchConfig, n: int) -> str:
    return json.dumps([CHECK_VERSION, __version__, rt.name, rt.fingerprint, str(rt.device), str(rt.dtype), precision,
                       cpu_capability() if rt.device.type == "cpu" else None,
                       hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16], torch.__version__,
                       list(presentations), n, SAMPLE_SEED, cfg.tokens, cfg.dim, cfg.bound, cfg.scale])


def _cache_file(key: str, cache_dir: Path) -> Path:
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def default_cache_dir() -> Path:
    return cache_root() / "fidelity"


def cached(rt: Runtime, precision: str, presentations: Sequence[str], cfg: SearchConfig, n: int,
           cache_dir: Path | None = None) -> Scored | None:
    key = _key(rt, precision, presentations, cfg, n)
    try:
        d = json.loads(_cache_file(key, cache_dir or default_cache_dir()).read_text())
        return Scored(**d["scored"]) if d.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score(rt: Runtime, survey: Survey, precision: str, presentations: Sequence[str], cfg: SearchConfig, *,
          n: int, use_cache: bool = True, cache_dir: Path | None = None,
          on_step: Callable[[int], None] | None = None) -> tuple[Scored, bool]:
    """The sample's answers in ``precision`` (on a search copy of ``rt``), timed; from the cache when there.
    Returns (scored, from_cache). ``on_step(k)``: k more presentation-evaluations done."""
    key = _key(rt, precision, presentations, cfg, n)
    path = _cache_file(key, cache_dir or default_cache_dir())
    hit = cached(rt, precision, presentations, cfg, n, cache_dir) if use_cache else None
    if hit is not None:
        if on_step:
            on_step(n * len(presentations))
        return hit, True
    prompts = sample(rt, cfg, n)
    search_rt = precisions.search_runtime(rt, precision)
    scorer = SurveyScorer(search_rt, survey, list(presentations), answer_cache=None)
    expected, mass, seconds = {}, {}, 0.0
    for name in presentations:
        parts = []
        for start in range(0, n, scorer.block):  # the search's own blocks, so the rate is the search's
            t0 = time.perf_counter()
            parts.append(scorer.answers(prompts[start:start + scorer.block], [name])[name])
            seconds += time.perf_counter() - t0
            if on_step:
                on_step(len(parts[-1].expected))
        expected[name] = torch.cat([a.expected for a in parts]).tolist()
        mass[name] = torch.cat([a.mass for a in parts]).tolist()
    scored = Scored(precision, list(presentations), expected, mass, seconds)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "scored": asdict(scored)}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
    return scored, False


def compare(survey: Survey, reference: Scored, other: Scored, naive_mass: dict[str, float], cfg: SearchConfig,
            constant: float = DEFAULT_CONSTANT, from_cache: bool = False) -> Fidelity:
    """Spearman, max index difference and same best of ``other`` against ``reference`` on the training objective
    (``cfg``'s aggregate and mass guard) for every panel target."""
    from scipy.stats import spearmanr

    names = reference.presentations
    robust, guard = Robust.parse(cfg.robust), MassGuard(naive_mass, cfg.mass_floor, cfg.mass_weight)

    def per_candidate(s: Scored, target) -> list[dict]:
        answers = {n: Answers(torch.tensor(s.expected[n]), torch.tensor(s.mass[n])) for n in names}
        return presentation_scores(survey, answers, target, constant)

    spearman, same, diff = 1.0, 0, 0.0
    targets = [resolve(c).scores for c in PANEL]
    for i, target in enumerate(targets):
        a, b = per_candidate(reference, target), per_candidate(other, target)
        la = np.array([robust([guard.loss(c[n]) for n in names]) for c in a])
        lb = np.array([robust([guard.loss(c[n]) for n in names]) for c in b])
        rho = float(spearmanr(la, lb).statistic) if la.std() > 0 and lb.std() > 0 else float("nan")
        spearman = float("nan") if math.isnan(rho) or math.isnan(spearman) else min(spearman, rho)
        same += int(np.argmin(la) == np.argmin(lb))
        if i == 0:  # indices do not depend on the target
            diff = max(abs(ca[n].indices[d] - cb[n].indices[d]) for ca, cb in zip(a, b) for n in names
                       for d in ca[n].indices)
    return Fidelity(other.precision, spearman, diff, same, len(targets), other.rate, reference.rate,
                    len(next(iter(reference.expected.values()))), list(names), from_cache)


def naive_mass(rt: Runtime, survey: Survey, presentations: Sequence[str]) -> dict[str, float]:
    """The bare float32 model's option mass per presentation: the mass guard's reference (the answer cache has it
    after any run's baselines)."""
    scorer = SurveyScorer(rt, survey, list(presentations))
    return {n: float(a.mass[0].mean()) for n, a in scorer.answers(None).items()}


def check(rt: Runtime, survey: Survey, precision: str, train: Sequence[str], cfg: SearchConfig | None = None, *,
          n: int | None = None, k: int | None = None, use_cache: bool = True, cache_dir: Path | None = None,
          progress: bool = False) -> Fidelity:
    """The fidelity of ``precision`` against float32 on ``rt`` (a float32 runtime) for a run training on ``train``:
    ``n`` candidates (default :data:`CANDIDATES`) on ``k`` of its presentations (default :data:`PRESENTATIONS`)."""
    cfg, n, k = cfg or SearchConfig(), n or CANDIDATES, k or PRESENTATIONS
    names = check_presentations(train, k)
    bar = progress_bar(2 * n * len(names), f"fidelity check ({precision} vs fp32)", "presentation", progress)
    ref, _ = score(rt, survey, precisions.REFERENCE, names, cfg, n=n, use_cache=use_cache, cache_dir=cache_dir,
                   on_step=bar.update)
    other, hit = score(rt, survey, precision, names, cfg, n=n, use_cache=use_cache, cache_dir=cache_dir,
                       on_step=bar.update)
    bar.close()
    return compare(survey, ref, other, naive_mass(rt, survey, names), cfg, from_cache=hit)


def probe(rt: Runtime, precision: str, rows: int = 256) -> float:
    """``precision``'s rate over float32's on one of the model's MLP linears, ``rows`` rows (what a scoring forward
    of 8 candidates feeds it; at 64 rows bf16 was no faster than float32 on AMX, while scoring ran 2x faster).
    Not cached: on a shared CPU one reading can be a neighbour's burst (int8 read 0.12x under load, 2.7x quiet);
    a precision once checked is not probed again (:func:`choose` reads its cached check instead)."""
    k = rt.hidden_size
    n = int(getattr(rt.model.config, "intermediate_size", None) or 4 * k)
    dev = str(rt.device)
    rates = {precision: 0.0, precisions.REFERENCE: 0.0}
    for _ in range(3):  # interleaved, the best of each: a burst hits both alike
        for name in rates:
            rates[name] = max(rates[name], precisions.linear_rate(name, rows, k, n, dev, repeat=1))
        if rates[precision] < 0.1 * rates[precisions.REFERENCE]:
            break  # emulated (bf16 on AVX2, ~0.02x): once is enough, and it is slow
    return rates[precision] / rates[precisions.REFERENCE]


# ---------------------------------------------------------------------------------------------------- the choice
def choose(rt: Runtime, survey: Survey, requested: str, train: Sequence[str], cfg: SearchConfig | None = None, *,
           force: bool = False, use_cache: bool = True, progress: bool = False,
           echo: Callable[[str], None] = print) -> Choice:
    """The precision a search on ``train`` runs in: ``fp32``, a named one (checked; refused with
    :class:`PrecisionRefused` when it fails, unless ``force``), or ``auto`` (see the module's doc)."""
    cfg = cfg or SearchConfig()
    if requested != "auto":
        precisions.get(requested)  # ValueError for an unknown name
    if requested == precisions.REFERENCE:
        return Choice(requested, requested, "asked for")
    if requested != "auto":
        why = precisions.unavailable(requested, rt)
        if why:
            raise PrecisionRefused(f"search precision {requested} cannot run here: {why}")
        f = check(rt, survey, requested, train, cfg, use_cache=use_cache, progress=progress)
        echo(_table([f], cfg))
        checks = {requested: f.to_dict()}
        if f.passes:
            return Choice(requested, requested, "asked for; passes the fidelity check", checks)
        if not force:
            raise PrecisionRefused(f"search precision {requested} fails the fidelity check (Spearman {f.spearman:.3f} "
                                   f"< {SPEARMAN_MIN}: it ranks candidates differently from float32); use fp32 or "
                                   "auto, or force it with --force-search-precision")
        echo(f"search precision {requested} FORCED although it fails the fidelity check")
        return Choice(requested, requested, "forced although it fails the fidelity check", checks)

    checks: dict[str, dict] = {}
    results: list[Fidelity] = []
    for name in precisions.PRECISIONS:
        if name == precisions.REFERENCE:
            continue
        why = precisions.unavailable(name, rt)
        if why is None and not (use_cache and cached(rt, name, check_presentations(train), cfg, CANDIDATES)):
            ratio = probe(rt, name)
            if ratio < PROBE_MIN:
                why = f"its linear layers run at {ratio:.2f}x float32's rate here (< {PROBE_MIN}): not checked"
        if why:
            checks[name] = {"skipped": why}
            continue
        f = check(rt, survey, name, train, cfg, use_cache=use_cache, progress=progress)
        checks[name] = f.to_dict()
        results.append(f)
    good = [f for f in results if f.passes and f.speedup >= MIN_SPEEDUP]
    if good:
        best = max(good, key=lambda f: f.rate)
        choice = Choice(best.precision, "auto", f"{best.speedup:.2f}x float32's rate, Spearman {best.spearman:.3f} "
                        f">= {SPEARMAN_MIN}: the fastest that passes", checks)
    else:
        choice = Choice(precisions.REFERENCE, "auto", f"no faster precision passes the fidelity check at >= "
                        f"{MIN_SPEEDUP}x float32's rate", checks)
    echo(f"search precision: auto chose {choice.name} ({choice.reason})")
    if results:
        echo(_table(results, cfg))
    for name, c in checks.items():
        if "skipped" in c:
            echo(f"  {name}: {c['skipped']}")
    return choice


def _table(results: Sequence[Fidelity], cfg: SearchConfig) -> str:
    f0 = results[0]
    lines = [f"  {HEADER}", f"  {'fp32':<6}{f0.reference_rate:>8.2f}{1:>8.2f}x"]
    lines += [f"  {f.line()}" for f in results]
    lines.append(f"  fidelity check: {f0.candidates} random candidates x {', '.join(f0.presentations)}, the training "
                 f"objective against the validity panel's {f0.targets} targets"
                 + ("; from the cache" if all(f.from_cache for f in results) else ""))
    return "\n".join(lines)
