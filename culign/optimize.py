"""Black-box search for a soft prompt over a low-dimensional space (Black-Box Tuning style), on a robust objective.

prompt(z) = P0 + (z @ A).view(tokens, hidden), z in [-bound, bound]^dim. A is a fixed random matrix rebuilt from
the seed and scaled to the embedding table's spread; P0 is the embedding of an init text (by default the persona
line, so the search starts where the persona baseline is) or of random vocabulary tokens.

The objective is robust: a candidate's loss is computed per training presentation (wording x template x order)
and aggregated (mean, worst, mean + k std), with the option-mass guard applied per presentation. Scoring every
candidate on every presentation costs a forward pass per presentation, so each generation scores its candidates
on a *subset* of the training presentations (``subset``, drawn from the seed and kept for ``rotate_every``
generations, so that DE pays for its parents' scores on a subset once, not every generation):

- **DE** compares each trial with its parent on the same subset (paired: a parent missing one of them is scored
  on it; scores are cached per candidate and presentation, so a parent that survives costs nothing the next
  time the subset comes round);
- **CMA-ES** ranks a generation's candidates on one shared subset, which is all its update needs; its candidate
  for the result is the distribution's mean, which averages the rankings of every generation;
- **random search** keeps the best of each generation.

After a generation, its best candidate is scored on every training presentation when it beats the best of these
*elites* on the generation's subset; the run's result is the best elite on the full training set or, where the
split has a validation family, the elite with the lowest validation loss among the best few. Every generation is checkpointed exactly,
so a killed run resumes to the same result.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import qmc

from .evaluation import MassGuard, PresentationScore, Robust, presentation_scores
from .scorer import SurveyScorer
from .survey import DEFAULT_CONSTANT, DIMENSIONS


class Init(str, Enum):
    PERSONA = "persona"  # embeddings of the persona line's tokens (the search starts at the persona baseline)
    VOCAB = "vocab"  # embeddings of random vocabulary tokens
    TEXT = "text"  # embeddings of a user-given init text


class Optimizer(str, Enum):
    DE = "de"  # Differential Evolution (the paper's choice)
    CMA = "cma"  # CMA-ES (Black-Box Tuning's choice), via the `cma` package
    RANDOM = "random"  # random search: the floor any optimiser must beat


# scipy's names, same meaning: the base vector (best / rand / current-to-best / rand-to-best), the number of
# difference vectors, and binomial or exponential crossover
STRATEGIES = ("best1bin", "rand1bin", "currenttobest1bin", "best2bin", "rand2bin", "randtobest1bin",
              "best1exp", "rand1exp")
_PARTNERS = {"best1": 2, "rand1": 3, "currenttobest1": 2, "best2": 4, "rand2": 5, "randtobest1": 3}  # distinct, != i


@dataclass
class SearchConfig:
    optimizer: Optimizer = field(default=Optimizer.DE, metadata={"help": "de, cma or random"})
    tokens: int = field(default=8, metadata={"help": "virtual tokens in the soft prompt"})
    dim: int = field(default=64, metadata={"help": "dimension of the search space z"})
    bound: float = field(default=1.0, metadata={"help": "z lies in [-bound, bound]^dim"})
    scale: float = field(default=1.0, metadata={"help": "prompt perturbation std for z ~ U(-b, b), in units of "
                                                         "the embedding table's std"})
    popsize: int = field(default=16, metadata={"help": "candidates per generation"})
    budget: int = field(default=1600, metadata={"help": "candidate evaluations in all, initial population included"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop the search early, at a generation "
                                                                        "boundary, rather than run past this time"})
    subset: int = field(default=1, metadata={"help": "training presentations each generation is scored on "
                                                      "(0: all of them)"})
    rotate_every: int = field(default=4, metadata={"help": "generations a subset is kept for before the next is "
                                                            "drawn (DE's parents are scored on it only once)"})
    robust: str = field(default="mean", metadata={"help": "aggregate over presentations: mean, worst, mean+Kstd"})
    strategy: str = field(default="best1bin", metadata={"help": "DE strategy (scipy's names)"})
    mutation: tuple[float, float] = field(default=(0.5, 1.0), metadata={"help": "DE dithered mutation factor range"})
    recombination: float = field(default=0.7, metadata={"help": "DE crossover probability"})
    sigma: float = field(default=0.3, metadata={"help": "CMA-ES initial step size, as a fraction of bound"})
    elites: int = field(default=8, metadata={"help": "best candidates (on the full training set) scored on the "
                                                      "validation presentations to pick the result"})
    seed: int = field(default=0, metadata={"help": "seeds A, P0 (vocab init), the subsets and the optimiser"})
    init: Init = field(default=Init.PERSONA, metadata={"help": "how P0 is chosen"})
    init_text: str | None = field(default=None, metadata={"help": "text for init=text (or persona override)"})
    mass_weight: float = field(default=100.0, metadata={"help": "loss added per unit of option mass below "
                                                               "mass_floor x the naive model's mass"})
    mass_floor: float = field(default=0.9, metadata={"help": "fraction of the naive option mass below which "
                                                              "a prompt is penalised"})

    def __post_init__(self):
        self.optimizer, self.init = Optimizer(self.optimizer), Init(self.init)
        self.mutation = tuple(float(m) for m in self.mutation)  # type: ignore[assignment]
        Robust.parse(self.robust)  # raises ValueError naming a bad aggregate
        if self.tokens < 1 or self.dim < 1:
            raise ValueError(f"tokens and dim must be >= 1, got tokens={self.tokens}, dim={self.dim}")
        if self.popsize < 5:
            raise ValueError(f"popsize must be >= 5 (DE needs distinct partners), got {self.popsize}")
        if self.strategy in STRATEGIES and self.popsize <= _PARTNERS[self.strategy[:-3]]:
            raise ValueError(f"strategy {self.strategy} needs popsize >= {_PARTNERS[self.strategy[:-3]] + 1}")
        if self.budget < 2 * self.popsize:
            raise ValueError(f"budget ({self.budget}) must cover the initial population and one generation "
                             f"(2 x popsize = {2 * self.popsize})")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.rotate_every < 1:
            raise ValueError(f"rotate_every must be >= 1, got {self.rotate_every}")
        if self.subset < 0:
            raise ValueError(f"subset must be >= 0 (0 = every training presentation), got {self.subset}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if not (0 < self.mutation[0] <= self.mutation[1] <= 2):
            raise ValueError(f"mutation range must satisfy 0 < lo <= hi <= 2, got {self.mutation}")
        if not 0 <= self.recombination <= 1:
            raise ValueError(f"recombination must be in [0, 1], got {self.recombination}")
        if self.bound <= 0 or self.scale <= 0 or self.sigma <= 0:
            raise ValueError("bound, scale and sigma must be > 0")
        if self.elites < 1:
            raise ValueError(f"elites must be >= 1, got {self.elites}")
        if self.init is Init.TEXT and not self.init_text:
            raise ValueError("init=text needs init_text")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optimizer"], d["init"], d["mutation"] = self.optimizer.value, self.init.value, list(self.mutation)
        return d

    def run_key(self, *extra: str) -> str:
        """Identity of a run for checkpoint matching: everything but the budget and the time limit (a resume may
        extend them)."""
        d = self.to_dict()
        d.pop("budget")
        d.pop("max_seconds")
        return hashlib.sha256(json.dumps([d, *extra], sort_keys=True).encode()).hexdigest()[:16]


class PromptSpace:
    """prompt(z) = P0 + (z @ A).view(tokens, hidden); A ~ N(0, s^2) with s chosen so a uniform z in [-b, b]
    moves each prompt element by ``scale`` x the embedding std."""

    def __init__(self, p0: torch.Tensor, cfg: SearchConfig, embed_std: float):
        self.p0 = p0.float().cpu()
        n, h = self.p0.shape
        g = torch.Generator().manual_seed(cfg.seed)
        z_std = cfg.bound / math.sqrt(3.0)  # std of U(-b, b)
        s = cfg.scale * embed_std / (math.sqrt(cfg.dim) * z_std)
        self.A = torch.randn(cfg.dim, n * h, generator=g) * s

    def prompts(self, z: np.ndarray) -> torch.Tensor:
        """z: [S, dim] -> prompts [S, tokens, hidden] (float32).

        Row by row: a [S, dim] @ A matmul rounds differently for another S, so the prompt saved from the best z
        (S = 1) would differ in the last bit from the one that was scored in its population.
        """
        zt = torch.as_tensor(np.atleast_2d(z), dtype=torch.float32)
        return torch.stack([self.p0 + (row @ self.A).view(self.p0.shape) for row in zt])


def initial_prompt(runtime, cfg: SearchConfig, persona: str) -> torch.Tensor:
    """P0 [tokens, hidden]: embeddings of the init text's first tokens (cycled) or of random vocab tokens."""
    emb = runtime.embedding_matrix.detach().float().cpu()
    if cfg.init is Init.VOCAB:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        ids = torch.randint(0, emb.shape[0], (cfg.tokens,), generator=g)
    else:
        text = cfg.init_text or persona
        toks = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"init text {text!r} has no tokens")
        ids = torch.tensor([toks[i % len(toks)] for i in range(cfg.tokens)])
    return emb[ids].clone()


def subset_for(block: int, names: Sequence[str], k: int, seed: int) -> list[str]:
    """The training presentations block ``block`` of generations (generation // rotate_every) is scored on: k
    drawn without replacement, from an RNG seeded by (seed, block) alone, so a resumed run draws the same subsets."""
    if k <= 0 or k >= len(names):
        return list(names)
    picks = np.random.default_rng([seed, block]).choice(len(names), size=k, replace=False)
    return [names[i] for i in sorted(picks)]


# ---------------------------------------------------------------------------------------------------- objective
class RobustObjective:
    """Per-presentation losses of candidates z, scored lazily and cached; aggregated by ``robust``.

    ``train`` are the presentations the search optimises; ``validation`` (may be empty) are scored only for the
    elites at the end. Every (z, presentation) pair is scored once (batched per presentation).
    """

    def __init__(self, scorer: SurveyScorer, space: PromptSpace, target: Mapping[str, float], train: Sequence[str],
                 robust: Robust, guard: MassGuard, constants: Mapping[str, float] | float = DEFAULT_CONSTANT,
                 on_scored: Callable[[int], None] | None = None):
        self.scorer, self.space, self.target, self.train = scorer, space, target, list(train)
        self.robust, self.guard, self.constants, self.on_scored = robust, guard, constants, on_scored
        self.cache: dict[bytes, dict[str, PresentationScore]] = {}
        self.presentation_evals = 0  # (candidate, presentation) pairs scored: the unit of cost
        # per index, the lowest and highest value any (candidate, presentation) gave: a target outside this range is
        # one the search never got near, which tells "unreachable for this model" apart from "needs more budget"
        self.seen_range: dict[str, list[float]] = {}

    @staticmethod
    def key(z: np.ndarray) -> bytes:
        return np.ascontiguousarray(z, dtype=np.float64).tobytes()

    def scores(self, Z: np.ndarray, names: Sequence[str]) -> list[dict[str, PresentationScore]]:
        """Per candidate (rows of Z), its scores on ``names``: the missing ones are scored now, per presentation."""
        Z = np.atleast_2d(Z)
        keys = [self.key(z) for z in Z]
        for name in names:
            todo = sorted({k for k in keys if name not in self.cache.get(k, {})}, key=keys.index)
            if not todo:
                continue
            rows = np.stack([np.frombuffer(k, dtype=np.float64) for k in todo])
            answers = self.scorer.answers(self.space.prompts(rows), [name])
            for k, per in zip(todo, presentation_scores(self.scorer.survey, answers, self.target, self.constants)):
                self.cache.setdefault(k, {})[name] = per[name]
                for d, v in per[name].indices.items():
                    lo, hi = self.seen_range.get(d, (v, v))
                    self.seen_range[d] = [min(lo, v), max(hi, v)]
            self.presentation_evals += len(todo)
            if self.on_scored:
                self.on_scored(len(todo))
        return [{n: self.cache[k][n] for n in names} for k in keys]

    def losses(self, Z: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """[S] robust aggregate of the mass-guarded per-presentation losses over ``names``."""
        return np.array([self.robust([self.guard.loss(s[n]) for n in names]) for s in self.scores(Z, names)])

    def value(self, z: np.ndarray, names: Sequence[str] | None = None) -> float:
        return float(self.losses(z[None], names or self.train)[0])

    # checkpointing: the cache entries a resumed run can still need
    def export(self, Z: Sequence[np.ndarray]) -> dict:
        out = {}
        for z in Z:
            k = self.key(z)
            if k in self.cache:
                out[k.hex()] = {n: s.to_dict() for n, s in self.cache[k].items()}
        return out

    def restore(self, entries: dict) -> None:
        for hexkey, per in entries.items():
            self.cache[bytes.fromhex(hexkey)] = {n: PresentationScore.from_dict(n, d) for n, d in per.items()}


# ---------------------------------------------------------------------------------------------------- optimisers
class _DE:
    """Differential Evolution, deferred updating, with paired selection on each generation's subset."""

    def __init__(self, cfg: SearchConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.population: np.ndarray | None = None
        self.energies: np.ndarray | None = None  # on the last generation's subset

    def start(self, objective: RobustObjective, subset: list[str]) -> np.ndarray:
        cfg = self.cfg
        # z = 0 (exactly P0) plus a Latin hypercube over the box, as scipy's DE starts
        lhs = qmc.LatinHypercube(d=cfg.dim, rng=self.rng).random(cfg.popsize - 1)
        self.population = np.vstack([np.zeros(cfg.dim), qmc.scale(lhs, -cfg.bound, cfg.bound)])
        self.energies = objective.losses(self.population, subset)
        return self.population

    def _mutants(self) -> np.ndarray:
        cfg, rng, pop = self.cfg, self.rng, self.population
        n = len(pop)
        F = rng.uniform(*cfg.mutation)  # dithered once per generation, as scipy does
        best = pop[int(np.argmin(self.energies))]
        out = np.empty_like(pop)
        s = cfg.strategy
        kind, pairs = s[:-4], int(s[-4])  # "randtobest1bin" -> ("randtobest", 1)
        for i in range(n):
            others = [j for j in range(n) if j != i]
            ps = [pop[j] for j in rng.choice(others, size=_PARTNERS[s[:-3]], replace=False)]
            if kind == "best":
                base = best
            elif kind == "rand":
                base = ps.pop(0)
            elif kind == "currenttobest":
                base = pop[i] + F * (best - pop[i])
            else:  # randtobest
                r0 = ps.pop(0)
                base = r0 + F * (best - r0)
            v = base + F * sum(ps[2 * k] - ps[2 * k + 1] for k in range(pairs))
            trial = pop[i].copy()
            if s.endswith("bin"):
                take = rng.random(cfg.dim) < cfg.recombination
                take[rng.integers(cfg.dim)] = True  # at least one coordinate from the mutant
                trial[take] = v[take]
            else:  # exp: a run of consecutive coordinates from a random start
                j, L = int(rng.integers(cfg.dim)), 0
                while True:
                    trial[(j + L) % cfg.dim] = v[(j + L) % cfg.dim]
                    L += 1
                    if L >= cfg.dim or rng.random() >= cfg.recombination:
                        break
            outside = np.abs(trial) > cfg.bound  # like scipy: a coordinate pushed out of the box is re-drawn
            trial[outside] = rng.uniform(-cfg.bound, cfg.bound, size=int(outside.sum()))
            out[i] = trial
        return out

    def step(self, objective: RobustObjective, subset: list[str]) -> np.ndarray:
        trials = self._mutants()
        both = objective.losses(np.vstack([trials, self.population]), subset)  # parents re-scored where missing
        trial_e, parent_e = both[: len(trials)], both[len(trials):]
        better = trial_e <= parent_e
        self.population = np.where(better[:, None], trials, self.population)
        self.energies = np.where(better, trial_e, parent_e)
        return trials

    def state(self) -> dict:
        return {"population": self.population.tolist(), "energies": self.energies.tolist(),
                "rng": self.rng.bit_generator.state}

    def load(self, st: dict) -> None:
        self.population, self.energies = np.array(st["population"]), np.array(st["energies"])
        self.rng.bit_generator.state = st["rng"]

    def members(self) -> list[np.ndarray]:
        return list(self.population)

    def best(self) -> np.ndarray:
        return self.population[int(np.argmin(self.energies))]


class _CMA:
    """CMA-ES (the `cma` package) in the box, ranking each generation on its subset."""

    def __init__(self, cfg: SearchConfig, rng: np.random.Generator):
        import cma  # an optional dependency: imported only when asked for

        self.cfg, self.rng = cfg, rng
        # cma draws from numpy's global RNG, seeded by its 'seed' option; its state is checkpointed with the run
        self.es = cma.CMAEvolutionStrategy(np.zeros(cfg.dim), cfg.sigma * cfg.bound,
                                           {"popsize": cfg.popsize, "bounds": [-cfg.bound, cfg.bound],
                                            "seed": cfg.seed + 1, "verbose": -9, "tolfun": 0, "tolx": 0,
                                            "tolfunhist": 0, "tolstagnation": 10**9})
        self.last: np.ndarray | None = None
        self.last_e: np.ndarray | None = None

    def start(self, objective: RobustObjective, subset: list[str]) -> np.ndarray:
        return self.step(objective, subset)  # the distribution's mean starts at z = 0, the persona start

    def step(self, objective: RobustObjective, subset: list[str]) -> np.ndarray:
        Z = np.array(self.es.ask())
        e = objective.losses(Z, subset)
        self.es.tell(list(Z), list(e))
        self.last, self.last_e = Z, e
        return Z

    def state(self) -> dict:
        import cma

        blob = pickle.dumps((self.es, np.random.get_state(), self.last, self.last_e))
        return {"cma_version": cma.__version__, "pickle": base64.b64encode(blob).decode()}

    def load(self, st: dict) -> None:
        import cma

        if st.get("cma_version") != cma.__version__:  # its pickled internals are that release's
            raise ValueError(f"this checkpoint was written with cma {st.get('cma_version')}, this is cma "
                             f"{cma.__version__}: resume with that release, or start afresh")
        # The run's own checkpoint, written by this code into the user's cache: unpickling it is safe.
        self.es, rs, self.last, self.last_e = pickle.loads(base64.b64decode(st["pickle"]))
        np.random.set_state(rs)

    def members(self) -> list[np.ndarray]:
        return [] if self.last is None else list(self.last)

    def best(self) -> np.ndarray:
        # The distribution's mean, not the luckiest sample: ranked on one presentation, a generation's best sample
        # is mostly noise, while the mean averages every ranking so far (CMA-ES's own favourite solution).
        return np.clip(np.asarray(self.es.result.xfavorite, dtype=float), -self.cfg.bound, self.cfg.bound)


class _Random:
    """Random search: popsize uniform samples from the box per generation (z = 0 among the first)."""

    def __init__(self, cfg: SearchConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.last: np.ndarray | None = None
        self.last_e: np.ndarray | None = None

    def start(self, objective: RobustObjective, subset: list[str]) -> np.ndarray:
        return self.step(objective, subset, first=True)

    def step(self, objective: RobustObjective, subset: list[str], first: bool = False) -> np.ndarray:
        Z = self.rng.uniform(-self.cfg.bound, self.cfg.bound, size=(self.cfg.popsize, self.cfg.dim))
        if first:
            Z[0] = 0.0
        self.last, self.last_e = Z, objective.losses(Z, subset)
        return Z

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load(self, st: dict) -> None:
        self.rng.bit_generator.state = st["rng"]

    def members(self) -> list[np.ndarray]:
        return []

    def best(self) -> np.ndarray:
        return self.last[int(np.argmin(self.last_e))]


_OPTIMIZERS = {Optimizer.DE: _DE, Optimizer.CMA: _CMA, Optimizer.RANDOM: _Random}


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class Progress:
    generation: int
    nfev: int
    presentation_evals: int
    best_loss: float  # the best elite's objective on every training presentation
    best_indices: dict[str, float]
    best_mass: float
    elapsed_s: float


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly: optimiser state, cached scores still needed, elites, history."""
    run_key: str
    generation: int
    nfev: int
    presentation_evals: int
    optimizer: dict
    cache: dict
    elites: list[list[float]]  # z of the best candidates on the full training set, best first
    history: list[list[float]]  # [nfev, best elite objective] per generation
    elapsed_s: float
    seen_range: dict[str, list[float]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self)))  # repr floats: the population round-trips exactly
        os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        return cls(**json.loads(path.read_text()))


@dataclass
class SearchResult:
    z: np.ndarray
    prompt: torch.Tensor
    objective: float  # the robust training objective of the result, as the search scored it
    nfev: int
    presentation_evals: int
    generations: int
    history: list[list[float]]
    elapsed_s: float
    stopped_by: str  # "budget", "time" (cfg.max_seconds) or "interrupt" (Ctrl-C)
    resumed_from: int | None
    seen_range: dict[str, list[float]]  # index -> [min, max] over every evaluated candidate and presentation
    selected_by: str  # "train" or "validation"
    elites: list[dict] = field(default_factory=list)  # [{train, validation}] of the candidates considered

    @property
    def interrupted(self) -> bool:
        return self.stopped_by == "interrupt"


def _elite_order(objective: RobustObjective, elites: list[np.ndarray]) -> list[np.ndarray]:
    return sorted(elites, key=lambda z: objective.value(z))


def run_search(objective: RobustObjective, cfg: SearchConfig, *, validation: Sequence[str] = (),
               checkpoint: Path | None = None, resume: bool = False, run_key: str = "",
               on_generation: Callable[[Progress], None] | None = None,
               on_batch: Callable[[int], None] | None = None,
               on_pick: Callable[[int, int], None] | None = None) -> SearchResult:
    """Search until the budget is spent (or Ctrl-C), checkpointing after every generation.

    The budget counts candidates (the initial population included) and is spent in whole generations of
    ``popsize``, rounded down. With ``cfg.max_seconds`` the search also stops before a generation that would
    end past that time (judged by the dearest of the last few generations; ``SearchResult.stopped_by`` says
    which limit ended it). ``on_batch`` is told how many candidates each generation added; ``on_pick(done, total)``
    how many elites the pick on ``validation`` has scored (0 first: on a 1.5B model the pick takes minutes).
    """
    rng = np.random.default_rng(cfg.seed)
    opt = _OPTIMIZERS[cfg.optimizer](cfg, rng)
    train = objective.train
    generation, nfev, history, elites, elapsed0, resumed_from = 0, 0, [], [], 0.0, None
    if resume and checkpoint is not None and checkpoint.exists():
        ck = Checkpoint.load(checkpoint)
        if ck.run_key != run_key:
            raise ValueError(f"checkpoint {checkpoint} belongs to a different run (settings, target or model "
                             "changed); remove it or drop --resume")
        opt.load(ck.optimizer)
        objective.restore(ck.cache)
        objective.presentation_evals, objective.seen_range = ck.presentation_evals, ck.seen_range
        generation, nfev, history, elapsed0 = ck.generation, ck.nfev, ck.history, ck.elapsed_s
        elites, resumed_from = [np.array(z) for z in ck.elites], ck.generation
    t0 = time.perf_counter()
    interrupted, stopped_by = False, "budget"
    # a generation's cost, for the time limit: the dearest of the last few (one that finds a new elite also scores
    # it on every training presentation); after a resume, the mean so far
    durations = [elapsed0 / generation] if generation else []

    try:
        while nfev + cfg.popsize <= cfg.budget:
            spent = elapsed0 + time.perf_counter() - t0
            if cfg.max_seconds is not None and durations and spent + max(durations[-4:]) > cfg.max_seconds:
                stopped_by = "time"
                break
            t_generation = time.perf_counter()
            subset = subset_for(generation // cfg.rotate_every, train, cfg.subset, cfg.seed)
            if generation == 0:
                opt.start(objective, subset)
            else:
                opt.step(objective, subset)
            generation += 1
            nfev += cfg.popsize
            if on_batch:
                on_batch(cfg.popsize)
            # elite: the generation's best is scored on every training presentation when it beats the best elite
            # on this generation's subset (the elite's scores there are cached: the comparison is free), so only
            # promising candidates cost a full scoring
            best = opt.best()
            if not any(np.array_equal(best, e) for e in elites) and (
                    not elites or objective.losses(best[None], subset)[0] < objective.losses(elites[0][None], subset)[0]):
                elites = _elite_order(objective, elites + [best.copy()])[: cfg.elites]
            top = elites[0]
            history.append([nfev, objective.value(top)])
            elapsed = elapsed0 + time.perf_counter() - t0
            if checkpoint is not None:
                keep = opt.members() + elites
                Checkpoint(run_key, generation, nfev, objective.presentation_evals, opt.state(),
                           objective.export(keep), [list(map(float, z)) for z in elites], history, elapsed,
                           objective.seen_range).save(checkpoint)
            if on_generation:
                s = objective.scores(top[None], train)[0]
                on_generation(Progress(generation, nfev, objective.presentation_evals, history[-1][1],
                                       {d: sum(x.indices[d] for x in s.values()) / len(s) for d in DIMENSIONS},
                                       sum(x.option_mass for x in s.values()) / len(s), elapsed))
            durations.append(time.perf_counter() - t_generation)  # scoring, elites and checkpoint: all of it
    except KeyboardInterrupt:
        interrupted = True  # keep the best prompt evaluated so far
    if not elites:
        elites = [np.zeros(cfg.dim)]
    chosen, selected_by, considered = elites[0], "train", []
    if validation and not interrupted:
        # the elite that generalises best to presentations the search never used (never the held-out ones)
        vals = []
        for z in elites:
            if on_pick:
                on_pick(len(vals), len(elites))
            vals.append(objective.value(z, list(validation)))
        if on_pick:
            on_pick(len(vals), len(elites))
        considered = [{"train": objective.value(z), "validation": v} for z, v in zip(elites, vals)]
        chosen, selected_by = elites[int(np.argmin(vals))], "validation"
    return SearchResult(chosen, objective.space.prompts(chosen)[0], objective.value(chosen),
                        nfev, objective.presentation_evals, generation, history,
                        elapsed0 + time.perf_counter() - t0, "interrupt" if interrupted else stopped_by,
                        resumed_from, objective.seen_range, selected_by, considered)
