"""The VSM 2013 instrument as data: items, presentations (how an item is put to a model), index formulas, L1 loss.

Knows nothing of torch or HTTP. The instrument is a JSON data file (``culign/data/vsm2013.json``) so a user can
swap in another survey with the same shape (items with a 1..5 scale, formulas as ``[coef, i, j]`` terms).

VSM 2013 questionnaire: copyright Geert Hofstede BV, offered free for academic research (see NOTICE).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

DIMENSIONS = ("PDI", "IDV", "MAS", "UAI", "LTO", "IVR")
ANSWERS = (1, 2, 3, 4, 5)

# Default index constant C for every dimension: a respondent answering the same everywhere (e.g. the midpoint)
# has all item differences 0 and scores exactly C, so 50 puts "no preference" in the middle of Hofstede's 0..100.
DEFAULT_CONSTANT = 50.0


@dataclass(frozen=True)
class Item:
    id: int
    section: str
    stem: str | None
    text: str
    scale: Mapping[int, str]  # answer value 1..5 -> label

    @property
    def question(self) -> str:
        return f"{self.stem}\n{self.text}" if self.stem else self.text


@dataclass(frozen=True)
class Survey:
    name: str
    items: tuple[Item, ...]
    formulas: Mapping[str, tuple[tuple[float, int, int], ...]]  # dim -> ((coef, i, j), ...) meaning coef*(m_i - m_j)
    license_note: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Survey":
        if path is None:
            raw = json.loads(resources.files("culign.data").joinpath("vsm2013.json").read_text(encoding="utf-8"))
        else:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        items = tuple(
            Item(int(it["id"]), it.get("section", ""), it.get("stem"), it["text"],
                 {int(k): v for k, v in it["scale"].items()})
            for it in raw["items"]
        )
        formulas = {dim: tuple((float(c), int(i), int(j)) for c, i, j in f["terms"]) for dim, f in raw["formulas"].items()}
        ids = {it.id for it in items}
        for dim, terms in formulas.items():
            for _, i, j in terms:
                if i not in ids or j not in ids:
                    raise ValueError(f"formula {dim} refers to item {i} or {j}, not in the survey")
        for it in items:
            if sorted(it.scale) != list(ANSWERS):
                raise ValueError(f"item {it.id}: scale must have answers 1..5, got {sorted(it.scale)}")
        return cls(raw.get("name", "survey"), items, formulas, raw.get("license_note", ""))

    def indices(self, item_means: Mapping[int, float], constants: Mapping[str, float] | float = DEFAULT_CONSTANT
                ) -> dict[str, float]:
        """Six indices from mean answers per item id (1..5 scale), e.g. PDI = 35(m07-m02) + 25(m20-m23) + C."""
        out = {}
        for dim, terms in self.formulas.items():
            c = constants if isinstance(constants, (int, float)) else constants.get(dim, DEFAULT_CONSTANT)
            out[dim] = float(sum(coef * (item_means[i] - item_means[j]) for coef, i, j in terms) + c)
        return out


def l1_loss(indices: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Mean absolute error over the dimensions the target has (a partial target scores only what it has)."""
    dims = [d for d in target if target[d] is not None]
    if not dims:
        raise ValueError("target has no dimensions to compare against")
    return sum(abs(indices[d] - target[d]) for d in dims) / len(dims)


# ---------------------------------------------------------------------------------------------------------------
# Presentations: how an item is put to a chat model. Each gives chat messages, an assistant prefill, and how the
# digit the model picks maps back to the item's answer value (the reversed presentation renumbers the scale).
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Presentation:
    name: str
    system: str
    user_template: str  # fields: {stem}, {options}, {text}; the item's own text comes last so that items
    # sharing a stem and scale share a token prefix (the scorer runs that prefix once for all of them)
    option_format: str  # fields: {digit}, {label}
    option_joiner: str
    prefill: str  # assistant text before the answer digit: "Answer: " lifts the option mass to ~0.99 on SmolLM2
    reverse: bool = False  # digit k means answer 6-k
    description: str = ""

    def digit_to_answer(self, digit: int) -> int:
        return 6 - digit if self.reverse else digit

    def options(self, item: Item) -> str:
        order = ANSWERS
        return self.option_joiner.join(
            self.option_format.format(digit=d, label=item.scale[self.digit_to_answer(d)]) for d in order)

    def messages(self, item: Item, persona: str | None = None) -> list[dict[str, str]]:
        system = self.system if persona is None else f"{persona_line(persona)} {self.system}"
        user = self.user_template.format(stem=item.stem or "", options=self.options(item), text=item.text).strip()
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def persona_line(country: str) -> str:
    """The in-context (persona) baseline of the precursor study ('Act like you are someone from <country>')."""
    return f"Answer as a typical person from {country} would."


_STANDARD = Presentation(
    name="standard",
    system="You are taking a survey. Reply with the number of your answer only.",
    user_template="{stem}\nAnswer with one number from 1 to 5:\n{options}\n\n{text}",
    option_format="{digit} = {label}", option_joiner="\n", prefill="Answer: ",
    description="the VSM wording, scale listed 1..5 as in the questionnaire",
)
PRESENTATIONS: dict[str, Presentation] = {
    p.name: p
    for p in (
        _STANDARD,
        replace(_STANDARD, name="reversed", reverse=True,
                description="scale renumbered 5..1 (digit k means answer 6-k), mapped back when scoring"),
        Presentation(
            name="inline",
            system="Please answer the following questionnaire item honestly.",
            user_template="Options: {options}\n{stem}\nQuestion: {text}\nWhich option do you choose?",
            option_format="({digit}) {label}", option_joiner="; ", prefill="My choice: (",
            description="a different template: options inline, different system line and prefill",
        ),
    )
}


def get_presentation(name: str) -> Presentation:
    try:
        return PRESENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown presentation {name!r}; choose from {', '.join(PRESENTATIONS)}") from None


@dataclass(frozen=True)
class SurveyResult:
    """Scores of one respondent (one soft prompt) on one or more presentations."""
    item_means: dict[int, float]  # expected answer per item, averaged over presentations
    option_mass: float  # mean probability mass on the option tokens (reliability diagnostic)
    indices: dict[str, float]
    item_std: float  # spread of answers across items: the indices are built from item-to-item differences
    per_presentation: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> indices

    def loss(self, target: Mapping[str, float]) -> float:
        return l1_loss(self.indices, target)

    def to_dict(self) -> dict:
        return {"indices": self.indices, "option_mass": self.option_mass, "item_std": self.item_std,
                "item_means": {str(k): v for k, v in self.item_means.items()},
                "per_presentation": self.per_presentation}


def summarize(survey: Survey, item_means_by_pres: Mapping[str, Mapping[int, float]], mass: float,
              constants: Mapping[str, float] | float = DEFAULT_CONSTANT) -> SurveyResult:
    """Combine per-presentation item means into one result (indices of the averaged answers)."""
    names: Sequence[str] = list(item_means_by_pres)
    ids = [it.id for it in survey.items]
    means = {i: sum(item_means_by_pres[n][i] for n in names) / len(names) for i in ids}
    mu = sum(means.values()) / len(means)
    std = (sum((v - mu) ** 2 for v in means.values()) / len(means)) ** 0.5
    per = {n: survey.indices(item_means_by_pres[n], constants) for n in names}
    return SurveyResult(means, mass, survey.indices(means, constants), std, per)
