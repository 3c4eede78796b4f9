"""Differential Evolution over a low-dimensional soft-prompt space (Black-Box Tuning style).

prompt(z) = P0 + (z @ A).view(tokens, hidden), z in [-bound, bound]^dim. A is a fixed random matrix rebuilt from
the seed and scaled to the embedding table's spread; P0 is the embedding of an init text (by default the persona
line, so DE starts where the ICL baseline is) or of random vocabulary tokens. scipy's DE solver runs vectorised
(a whole population per call, scored in batched forward passes), one generation at a time, so that every
generation can be checkpointed, shown, and interrupted with the best prompt kept.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.optimize._differentialevolution import DifferentialEvolutionSolver  # per-generation control

from .scorer import SurveyScorer
from .survey import SurveyResult, l1_loss


class Init(str, Enum):
    PERSONA = "persona"  # embeddings of the persona line's tokens (DE starts at the ICL baseline)
    VOCAB = "vocab"  # embeddings of random vocabulary tokens
    TEXT = "text"  # embeddings of a user-given init text


STRATEGIES = ("best1bin", "rand1bin", "currenttobest1bin", "best2bin", "rand2bin", "randtobest1bin",
              "best1exp", "rand1exp")


@dataclass
class DEConfig:
    tokens: int = field(default=8, metadata={"help": "virtual tokens in the soft prompt"})
    dim: int = field(default=64, metadata={"help": "dimension of the search space z"})
    bound: float = field(default=1.0, metadata={"help": "z lies in [-bound, bound]^dim"})
    scale: float = field(default=1.0, metadata={"help": "prompt perturbation std for z ~ U(-b, b), in units of "
                                                         "the embedding table's std"})
    popsize: int = field(default=16, metadata={"help": "individuals in the population (not multiplied by dim)"})
    budget: int = field(default=1600, metadata={"help": "candidate evaluations in all, initial population included"})
    strategy: str = field(default="best1bin", metadata={"help": "scipy DE strategy"})
    mutation: tuple[float, float] = field(default=(0.5, 1.0), metadata={"help": "dithered mutation factor range"})
    recombination: float = field(default=0.7, metadata={"help": "crossover probability"})
    seed: int = field(default=0, metadata={"help": "seeds A, P0 (vocab init) and DE"})
    init: Init = field(default=Init.PERSONA, metadata={"help": "how P0 is chosen"})
    init_text: str | None = field(default=None, metadata={"help": "text for init=text (or persona override)"})
    mass_weight: float = field(default=100.0, metadata={"help": "loss added per unit of option mass below "
                                                               "mass_floor x the naive model's mass"})
    mass_floor: float = field(default=0.9, metadata={"help": "fraction of the naive option mass below which "
                                                              "a prompt is penalised"})

    def __post_init__(self):
        self.init = Init(self.init)
        self.mutation = tuple(float(m) for m in self.mutation)  # type: ignore[assignment]
        if self.tokens < 1 or self.dim < 1:
            raise ValueError(f"tokens and dim must be >= 1, got tokens={self.tokens}, dim={self.dim}")
        if self.popsize < 5:
            raise ValueError(f"popsize must be >= 5 (DE needs distinct partners), got {self.popsize}")
        if self.budget < 2 * self.popsize:
            raise ValueError(f"budget ({self.budget}) must cover the initial population and one generation "
                             f"(2 x popsize = {2 * self.popsize})")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if not (0 < self.mutation[0] <= self.mutation[1] <= 2):
            raise ValueError(f"mutation range must satisfy 0 < lo <= hi <= 2, got {self.mutation}")
        if not 0 <= self.recombination <= 1:
            raise ValueError(f"recombination must be in [0, 1], got {self.recombination}")
        if self.bound <= 0 or self.scale <= 0:
            raise ValueError("bound and scale must be > 0")
        if self.init is Init.TEXT and not self.init_text:
            raise ValueError("init=text needs init_text")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["init"] = self.init.value
        d["mutation"] = list(self.mutation)
        return d

    def run_key(self, *extra: str) -> str:
        """Identity of a run for checkpoint matching: everything but the budget (a resume may extend it)."""
        d = self.to_dict()
        d.pop("budget")
        return hashlib.sha256(json.dumps([d, *extra], sort_keys=True).encode()).hexdigest()[:16]


class PromptSpace:
    """prompt(z) = P0 + (z @ A).view(tokens, hidden); A ~ N(0, s^2) with s chosen so a uniform z in [-b, b]
    moves each prompt element by ``scale`` x the embedding std."""

    def __init__(self, p0: torch.Tensor, cfg: DEConfig, embed_std: float):
        self.p0 = p0.float().cpu()
        n, h = self.p0.shape
        g = torch.Generator().manual_seed(cfg.seed)
        z_std = cfg.bound / math.sqrt(3.0)  # std of U(-b, b)
        s = cfg.scale * embed_std / (math.sqrt(cfg.dim) * z_std)
        self.A = torch.randn(cfg.dim, n * h, generator=g) * s

    def prompts(self, z: np.ndarray) -> torch.Tensor:
        """z: [S, dim] -> prompts [S, tokens, hidden] (float32).

        Row by row: a [S, dim] @ A matmul rounds differently for another S, so the prompt saved from DE's best z
        (S = 1) would differ in the last bit from the one DE scored in its population, and so would its score.
        """
        zt = torch.as_tensor(np.atleast_2d(z), dtype=torch.float32)
        return torch.stack([self.p0 + (row @ self.A).view(self.p0.shape) for row in zt])


def initial_prompt(runtime, cfg: DEConfig, persona: str) -> torch.Tensor:
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


@dataclass
class Progress:
    generation: int
    nfev: int
    best_loss: float
    best: SurveyResult
    elapsed_s: float


class Objective:
    """Vectorised DE objective: x [dim, S] -> losses [S]; remembers the best candidate ever evaluated."""

    def __init__(self, scorer: SurveyScorer, space: PromptSpace, target: dict[str, float], cfg: DEConfig,
                 ref_mass: float, on_batch: Callable[[int], None] | None = None):
        self.scorer, self.space, self.target, self.cfg, self.ref_mass = scorer, space, target, cfg, ref_mass
        self.on_batch = on_batch
        self.best_loss, self.best_z, self.best_result = math.inf, None, None
        self.nfev = 0
        # per index, the lowest and highest value any evaluated prompt gave: a target outside this range is one
        # DE never got near, which tells "unreachable for this model" apart from "needs more budget"
        self.seen_range: dict[str, list[float]] = {}

    def loss_of(self, r: SurveyResult) -> float:
        # L1 averaged over the training presentations, plus a penalty when the prompt wins by collapsing the
        # answer distribution (option mass far below the naive model's)
        l1 = sum(l1_loss(ind, self.target) for ind in r.per_presentation.values()) / len(r.per_presentation)
        shortfall = max(0.0, self.cfg.mass_floor * self.ref_mass - r.option_mass)
        return l1 + self.cfg.mass_weight * shortfall

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(x.T)  # scipy passes [dim, S]
        results = self.scorer.score(self.space.prompts(z))
        losses = np.array([self.loss_of(r) for r in results])
        for r in results:
            for dim, value in r.indices.items():
                lo, hi = self.seen_range.get(dim, (value, value))
                self.seen_range[dim] = [min(lo, value), max(hi, value)]
        i = int(np.argmin(losses))
        if losses[i] < self.best_loss:
            self.best_loss, self.best_z, self.best_result = float(losses[i]), z[i].copy(), results[i]
        self.nfev += len(losses)
        if self.on_batch:
            self.on_batch(len(losses))
        return losses


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly: population (solver's unit space), energies, RNG, history."""
    run_key: str
    generation: int
    nfev: int  # candidate evaluations
    solver_calls: int  # scipy's own counter (vectorised calls)
    population: list[list[float]]
    energies: list[float]
    rng_state: dict
    sample_order: list[int]  # scipy shuffles this index array in place when picking partners: hidden state
    best_loss: float
    best_z: list[float]
    history: list[list[float]]  # [nfev, best loss] per generation
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
class DEResult:
    z: np.ndarray
    prompt: torch.Tensor
    loss: float
    result: SurveyResult
    nfev: int
    generations: int
    history: list[list[float]]
    elapsed_s: float
    interrupted: bool
    resumed_from: int | None
    seen_range: dict[str, list[float]]  # index -> [min, max] over every evaluated prompt


def run_de(scorer: SurveyScorer, space: PromptSpace, target: dict[str, float], cfg: DEConfig, *,
           ref_mass: float, checkpoint: Path | None = None, resume: bool = False, run_key: str = "",
           on_generation: Callable[[Progress], None] | None = None,
           on_batch: Callable[[int], None] | None = None) -> DEResult:
    """Run DE until the budget is spent (or Ctrl-C), checkpointing after every generation.

    The budget counts candidate evaluations and is spent in whole generations of ``popsize`` (the initial
    population included), rounded down. (scipy's own ``maxfun`` counts calls when vectorised, so it is not used.)
    """
    objective = Objective(scorer, space, target, cfg, ref_mass, on_batch)
    rng = np.random.default_rng(cfg.seed)
    # explicit initial population: z = 0 (exactly P0) plus uniform samples, so popsize is the population size
    init = rng.uniform(-cfg.bound, cfg.bound, size=(cfg.popsize, cfg.dim))
    init[0] = 0.0
    solver = DifferentialEvolutionSolver(
        objective, [(-cfg.bound, cfg.bound)] * cfg.dim, strategy=cfg.strategy, maxiter=10**9, popsize=cfg.popsize,
        tol=0, atol=0, mutation=cfg.mutation, recombination=cfg.recombination, rng=rng, maxfun=10**9,
        polish=False, init=init, updating="deferred", vectorized=True)
    generation, history, elapsed0, resumed_from = 0, [], 0.0, None
    if resume and checkpoint is not None and checkpoint.exists():
        ck = Checkpoint.load(checkpoint)
        if ck.run_key != run_key:
            raise ValueError(f"checkpoint {checkpoint} belongs to a different run (settings, target or model "
                             "changed); remove it or drop --resume")
        solver.population = np.array(ck.population)
        solver.population_energies = np.array(ck.energies)
        solver.random_number_generator.bit_generator.state = ck.rng_state
        solver._random_population_index = np.array(ck.sample_order)
        solver._nfev = ck.solver_calls
        objective.nfev, objective.best_loss, objective.best_z = ck.nfev, ck.best_loss, np.array(ck.best_z)
        objective.seen_range = ck.seen_range
        generation, history, elapsed0, resumed_from = ck.generation, ck.history, ck.elapsed_s, ck.generation
    t0 = time.perf_counter()
    interrupted = False
    try:
        while objective.nfev + cfg.popsize <= cfg.budget:
            next(solver)
            generation += 1
            history.append([objective.nfev, float(solver.population_energies[0])])
            elapsed = elapsed0 + time.perf_counter() - t0
            if checkpoint is not None:
                best_z = objective.best_z if objective.best_z is not None else np.zeros(cfg.dim)
                Checkpoint(run_key, generation, objective.nfev, int(solver._nfev), solver.population.tolist(),
                           solver.population_energies.tolist(), solver.random_number_generator.bit_generator.state,
                           solver._random_population_index.tolist(),
                           float(objective.best_loss), list(map(float, best_z)), history, elapsed,
                           objective.seen_range).save(checkpoint)
            if on_generation and objective.best_result is not None:
                on_generation(Progress(generation, objective.nfev, objective.best_loss, objective.best_result,
                                       elapsed))
    except KeyboardInterrupt:
        interrupted = True  # keep the best prompt evaluated so far
    best_z = objective.best_z if objective.best_z is not None else np.zeros(cfg.dim)
    best_result = objective.best_result or scorer.score(space.prompts(best_z))[0]
    return DEResult(best_z, space.prompts(best_z)[0], objective.loss_of(best_result), best_result,
                    objective.nfev, generation, history, elapsed0 + time.perf_counter() - t0, interrupted,
                    resumed_from, objective.seen_range)
