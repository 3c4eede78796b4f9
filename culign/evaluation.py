"""Evaluation: the one place answers become indices and losses, and the one path every report takes.

``evaluate(runtime, survey, target, respondents, split)`` scores each respondent (the naive model, the persona
baseline, a soft prompt) on every presentation of a split and returns one :class:`Evaluation` per respondent:
losses per presentation, the training / validation / held-out losses (held-out as the mean of its families'
means, so a family with many presentations does not outvote the others), and the indices on each side.
:class:`Comparison` puts a naive row beside the others and says what a user needs to trust a gain: *gain kept*
on held-out presentations, and the naive model's own spread across presentations (its noise band).

Training uses the same pieces (:func:`presentation_scores`, :class:`Robust`, :class:`MassGuard`), so the loss DE
minimises and the loss a report prints are computed by the same code.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .model.runtime import Runtime
from .scorer import Answers, SurveyScorer
from .survey import DEFAULT_CONSTANT, DIMENSIONS, LEGACY_NAMES, Split, Survey, l1_loss, persona_line
from .targets import Target


# ---------------------------------------------------------------------------------------------------- one presentation
@dataclass(frozen=True)
class PresentationScore:
    """One respondent on one presentation."""
    name: str
    indices: dict[str, float]
    loss: float  # L1 against the target
    option_mass: float  # mean probability on the option digits (reliability: low means the model wandered off)
    item_std: float  # spread of the 24 answers: the indices are built from item-to-item differences
    item_means: dict[int, float] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {"indices": self.indices, "loss": self.loss, "option_mass": self.option_mass,
                "item_std": self.item_std, "item_means": {str(k): v for k, v in self.item_means.items()}}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "PresentationScore":
        return cls(name, dict(d["indices"]), float(d["loss"]), float(d["option_mass"]), float(d["item_std"]),
                   {int(k): float(v) for k, v in d.get("item_means", {}).items()})


def presentation_scores(survey: Survey, answers: Mapping[str, Answers], target: Mapping[str, float],
                        constants: Mapping[str, float] | float = DEFAULT_CONSTANT) -> list[dict[str, PresentationScore]]:
    """Scorer output (per presentation, S candidates) -> per candidate, per presentation: indices and loss."""
    ids = survey.item_ids
    S = next(iter(answers.values())).expected.shape[0]
    out: list[dict[str, PresentationScore]] = [{} for _ in range(S)]
    for name, a in answers.items():
        for s in range(S):
            means = dict(zip(ids, a.expected[s].tolist()))
            indices = survey.indices(means, constants)
            mu = sum(means.values()) / len(means)
            std = math.sqrt(sum((v - mu) ** 2 for v in means.values()) / len(means))
            out[s][name] = PresentationScore(name, indices, l1_loss(indices, target), float(a.mass[s].mean()), std,
                                             means)
    return out


# ---------------------------------------------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class Robust:
    """How per-presentation losses become one number: ``mean`` (default), ``worst`` (the max) or ``mean+Kstd``."""
    kind: str = "mean"
    k: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "Robust":
        spec = spec.strip().lower().replace(" ", "")
        if spec in ("mean", "worst"):
            return cls(spec)
        m = re.fullmatch(r"mean\+(\d+(?:\.\d+)?)\*?std", spec)
        if m:
            return cls("meanstd", float(m.group(1)))
        raise ValueError(f"unknown robust aggregate {spec!r}: use mean, worst or mean+Kstd (e.g. mean+1std)")

    def __call__(self, losses: Sequence[float]) -> float:
        if not losses:
            raise ValueError("no losses to aggregate")
        if self.kind == "worst":
            return max(losses)
        mean = sum(losses) / len(losses)
        if self.kind == "meanstd":
            return mean + self.k * (statistics.pstdev(losses) if len(losses) > 1 else 0.0)
        return mean

    def __str__(self) -> str:
        return {"mean": "mean", "worst": "worst"}.get(self.kind, f"mean+{self.k:g}std")


@dataclass(frozen=True)
class MassGuard:
    """A prompt that 'wins' by pushing probability off the option digits is penalised, per presentation:
    loss + weight x (floor x naive mass - mass) wherever the option mass falls below ``floor`` x the naive model's."""
    reference: Mapping[str, float]  # presentation -> the naive model's option mass there
    floor: float = 0.9
    weight: float = 100.0

    def penalty(self, score: PresentationScore) -> float:
        return self.weight * max(0.0, self.floor * self.reference[score.name] - score.option_mass)

    def loss(self, score: PresentationScore) -> float:
        return score.loss + self.penalty(score)


def family_mean(scores: Mapping[str, PresentationScore], families: Mapping[str, Sequence[str]],
                value: Callable[[PresentationScore], float] = lambda s: s.loss) -> tuple[float | None, dict[str, float]]:
    """Mean over families of each family's mean (families with no scored presentation are left out)."""
    per = {}
    for fam, names in families.items():
        vals = [value(scores[n]) for n in names if n in scores]
        if vals:
            per[fam] = sum(vals) / len(vals)
    return (sum(per.values()) / len(per) if per else None), per


def order_slope(scores: Mapping[str, PresentationScore], naive: Mapping[str, PresentationScore]) -> float | None:
    """Does a respondent move what the answers *mean*, or which *digit* the model picks? Over every pair of
    presentations that differ only in the scale order (``w/t/asc``, ``w/t/desc``) scored for both, the
    least-squares slope of the index moves (against ``naive``, per index) on the reversed scale on those on the
    ascending one. +1: the moves follow the labels; -1: they follow the digit's position, so a gain on ascending
    scales is a loss on reversed ones. None without such pairs."""
    asc, desc = [], []
    for name in scores:
        if not name.endswith("/asc"):
            continue
        twin = name[: -len("asc")] + "desc"
        if twin in scores and name in naive and twin in naive:
            for d in DIMENSIONS:
                asc.append(scores[name].indices[d] - naive[name].indices[d])
                desc.append(scores[twin].indices[d] - naive[twin].indices[d])
    norm = sum(a * a for a in asc)
    return sum(a * b for a, b in zip(asc, desc)) / norm if norm > 1e-12 else None


def mean_indices(scores: Sequence[PresentationScore]) -> dict[str, float]:
    return {d: sum(s.indices[d] for s in scores) / len(scores) for d in DIMENSIONS}


# ---------------------------------------------------------------------------------------------------- respondents
@dataclass(frozen=True)
class Respondent:
    """Who answers the survey: the bare model, the model with a persona line, or the model with a soft prompt."""
    label: str
    soft_prompt: torch.Tensor | None = None  # [n, hidden]
    persona: str | None = None  # country name for the persona line

    @classmethod
    def naive(cls) -> "Respondent":
        return cls("naive")

    @classmethod
    def with_persona(cls, country: str) -> "Respondent":
        return cls("persona", persona=country)


@dataclass
class Evaluation:
    """One respondent on every presentation of a split."""
    label: str
    target: Target
    split: Split
    scores: dict[str, PresentationScore]
    extra: dict = field(default_factory=dict)

    def _scored(self, names: Sequence[str]) -> list[PresentationScore]:
        return [self.scores[n] for n in names if n in self.scores]

    @property
    def train_loss(self) -> float:
        train = self._scored(self.split.train)
        return sum(s.loss for s in train) / len(train)

    @property
    def validation_loss(self) -> float | None:
        return family_mean(self.scores, self.split.validation)[0]

    @property
    def heldout_loss(self) -> float | None:
        return family_mean(self.scores, self.split.heldout)[0]

    @property
    def heldout_by_family(self) -> dict[str, float]:
        return family_mean(self.scores, self.split.heldout)[1]

    @property
    def train_indices(self) -> dict[str, float]:
        return mean_indices(self._scored(self.split.train))

    @property
    def heldout_indices(self) -> dict[str, float] | None:
        """Held-out indices, each family weighted equally (as the held-out loss is)."""
        fams = [self._scored(names) for names in self.split.heldout.values()]
        fams = [mean_indices(f) for f in fams if f]
        if not fams:
            return None
        return {d: sum(f[d] for f in fams) / len(fams) for d in DIMENSIONS}

    @property
    def option_mass(self) -> float:
        train = self._scored(self.split.train)
        return sum(s.option_mass for s in train) / len(train)

    @property
    def item_std(self) -> float:
        train = self._scored(self.split.train)
        return sum(s.item_std for s in train) / len(train)

    def to_dict(self) -> dict:
        return {"label": self.label, "loss": self.train_loss, "train_loss": self.train_loss,
                "validation_loss": self.validation_loss, "heldout_loss": self.heldout_loss,
                "heldout_by_family": self.heldout_by_family, "indices": self.train_indices,
                "heldout_indices": self.heldout_indices, "option_mass": self.option_mass, "item_std": self.item_std,
                "errors": {d: self.train_indices[d] - v for d, v in self.target.scores.items()},
                "per_presentation": {n: s.to_dict() for n, s in self.scores.items()}, **self.extra}


class Evaluator:
    """Scores respondents on a split with one scorer per persona (the naive model and every soft prompt share
    one), each built once."""

    def __init__(self, runtime: Runtime, survey: Survey, target: Target, split: Split,
                 constants: Mapping[str, float] | float = DEFAULT_CONSTANT):
        self.runtime, self.survey, self.target, self.split, self.constants = runtime, survey, target, split, constants
        self._scorers: dict[str | None, SurveyScorer] = {}

    def scorer(self, persona: str | None = None) -> SurveyScorer:
        if persona not in self._scorers:
            self._scorers[persona] = SurveyScorer(self.runtime, self.survey, self.split.all_names, persona=persona)
        return self._scorers[persona]

    def evaluate(self, respondent: Respondent, names: Sequence[str] | None = None,
                 on_presentation: Callable[[str], None] | None = None) -> Evaluation:
        """The respondent alone (a batch of one) on every presentation of the split, or on ``names``."""
        scorer = self.scorer(respondent.persona)
        prompt = None if respondent.soft_prompt is None else respondent.soft_prompt.unsqueeze(0)
        scores = {}
        for name in names if names is not None else self.split.all_names:
            answers = scorer.answers(prompt, [name])
            scores[name] = presentation_scores(self.survey, answers, self.target.scores, self.constants)[0][name]
            if on_presentation:
                on_presentation(name)
        extra = {"persona": persona_line(respondent.persona)} if respondent.persona else {}
        return Evaluation(respondent.label, self.target, self.split, scores, extra)


def evaluate(runtime: Runtime, survey: Survey, target: Target, respondents: Sequence[Respondent], split: Split,
             constants: Mapping[str, float] | float = DEFAULT_CONSTANT,
             on_presentation: Callable[[str], None] | None = None) -> list[Evaluation]:
    ev = Evaluator(runtime, survey, target, split, constants)
    return [ev.evaluate(r, on_presentation=on_presentation) for r in respondents]


# ---------------------------------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Rows on the same split, the first being the naive model: what a report and `culign eval` print."""
    target: Target
    split: Split
    rows: list[Evaluation]

    @property
    def naive(self) -> Evaluation:
        return self.rows[0]

    def noise_band(self) -> dict[str, float]:
        """Per index, the naive model's standard deviation across every presentation scored, and the same for the
        loss (key ``L1``): how far the model's answers move when only the wording, template or order changes."""
        scores = list(self.naive.scores.values())
        band = {d: statistics.pstdev([s.indices[d] for s in scores]) for d in DIMENSIONS}
        band["L1"] = statistics.pstdev([s.loss for s in scores])
        return band

    def gain_kept(self, row: Evaluation) -> float | None:
        """(naive held-out - row held-out) / (naive train - row train): the share of the training gain that held on
        presentations the optimiser never saw. None when there is no training gain to keep (or no held-out)."""
        nh, rh = self.naive.heldout_loss, row.heldout_loss
        train_gain = self.naive.train_loss - row.train_loss
        if nh is None or rh is None or train_gain <= 1e-9:
            return None
        return (nh - rh) / train_gain

    def gain_kept_by_family(self, row: Evaluation) -> dict[str, float]:
        """Gain kept on each held-out family alone: where the training gain holds (a new wording, say) and where it
        turns around (a reversed scale). Empty when there is no training gain to keep."""
        train_gain = self.naive.train_loss - row.train_loss
        if train_gain <= 1e-9:
            return {}
        naive, mine = self.naive.heldout_by_family, row.heldout_by_family
        return {f: (naive[f] - mine[f]) / train_gain for f in naive if f in mine}

    def significance(self, row: Evaluation) -> dict[str, dict]:
        """Held-out gain per index and in L1 against the naive model's noise band: a gain inside the band is not
        told apart from what a change of wording alone does."""
        band = self.noise_band()
        out = {}
        nh, rh = self.naive.heldout_indices, row.heldout_indices
        if nh is None or rh is None:
            return out
        for d, t in self.target.scores.items():
            gain = abs(nh[d] - t) - abs(rh[d] - t)
            out[d] = {"gain": gain, "band": band[d], "significant": gain > band[d]}
        gain = self.naive.heldout_loss - row.heldout_loss
        out["L1"] = {"gain": gain, "band": band["L1"], "significant": gain > band["L1"]}
        return out

    def heldout_wins(self, row: Evaluation) -> tuple[int, int]:
        """On how many held-out presentations the row's loss is below the naive model's, of how many: a paired
        count that, unlike the band, does not mix the presentations' own differences into the comparison."""
        names = [n for n in self.split.heldout_names if n in row.scores and n in self.naive.scores]
        return sum(row.scores[n].loss < self.naive.scores[n].loss for n in names), len(names)

    def order_slope(self, row: Evaluation) -> float | None:
        """The row's :func:`order_slope` against the naive model (-1: it moves digits, not meanings)."""
        return order_slope(row.scores, self.naive.scores)

    def to_dict(self) -> dict:
        rows = {}
        for r in self.rows:
            d = r.to_dict()
            if r is not self.naive:
                d["gain_kept"] = self.gain_kept(r)
                d["gain_kept_by_family"] = self.gain_kept_by_family(r)
                d["order_slope"] = self.order_slope(r)
                d["significance"] = self.significance(r)
                d["heldout_wins"] = list(self.heldout_wins(r))
            rows[r.label] = d
        return {"target": self.target.to_dict(), "split": self.split.to_dict(), "noise_band": self.noise_band(),
                "rows": rows}

    @classmethod
    def from_dict(cls, report: Mapping) -> "Comparison":
        """Rebuild a comparison from a report.json, to redraw or re-render it. Reports of culign before 0.2 (rows
        naive / icl / de, one training presentation, held-out as one group) are read too."""
        t = report["target"]
        target = Target(t["key"], t["name"], dict(t["scores"]), t.get("source", ""), t.get("code"),
                        tuple(t.get("missing", ())))
        if "split" in report:
            split = Split.from_dict(report["split"])
            rows = [Evaluation(label, target, split,
                               {n: PresentationScore.from_dict(n, d) for n, d in row["per_presentation"].items()},
                               {k: row[k] for k in ("persona", "adapter") if k in row})
                    for label, row in report["rows"].items()]
            return cls(target, split, _naive_first(rows))
        # the old layout: per presentation only indices; losses follow from them, mass and spread are the row's
        canon = lambda n: LEGACY_NAMES.get(n, n)  # noqa: E731
        held = tuple(canon(n) for n in report.get("heldout_presentations", []))
        split = Split(tuple(canon(n) for n in report.get("train_presentations", ["standard"])), {},
                      {"held-out": held} if held else {})
        rows = []
        for label, row in report["rows"].items():
            scores = {}
            for part in (row, row.get("heldout") or {}):
                for n, ind in part.get("per_presentation", {}).items():
                    scores[canon(n)] = PresentationScore(canon(n), dict(ind), l1_loss(ind, target.scores),
                                                         float(part.get("option_mass", 0.0)),
                                                         float(part.get("item_std", 0.0)))
            rows.append(Evaluation({"icl": "persona", "de": "adapter"}.get(label, label), target, split, scores))
        return cls(target, split, _naive_first(rows))


def _naive_first(rows: list[Evaluation]) -> list[Evaluation]:
    """naive, persona, then the rest in their order (report.json sorts its keys)."""
    rank = {"naive": 0, "persona": 1}
    return sorted(rows, key=lambda r: rank.get(r.label, 2))
