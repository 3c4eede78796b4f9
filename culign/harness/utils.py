"""lm-evaluation-harness hooks for culign's VSM 2013 task (referenced as ``!function utils.*`` by the YAML files
beside this one): the survey as multiple-choice documents, and the aggregations that turn per-item answers into
the six indices and the L1 loss against a region.

Each document is one item of one presentation (wording x template x order). The harness renders it with the
model's own chat template (``--apply_chat_template``): the template's system line as ``description``, the user turn
as the text, the template's prefill as ``gen_prefix``; each choice is the option digit written where the prefill
ends (``" 3"`` after ``Answer:``). The harness scores the five choices by log-likelihood; normalised over the five,
that is culign's **digit read-out** (the probability of each option digit after the prefill): for tokenizers that
write the space before a digit as its own token (SmolLM2, Llama 3), the space's log-probability is the same for
all five and cancels.
"""
from __future__ import annotations

import math

from culign.survey import ANSWERS, DEFAULT_CONSTANT, DIMENSIONS, Survey, l1_loss
from culign.targets import resolve


def survey_docs(presentation: str = "vsm/chat/asc", region: str = "US", saudi_variant: str | None = None,
                **_ignored):
    """``custom_dataset``: the 24 items of one presentation as documents (``--metadata`` may set presentation and
    region)."""
    import datasets

    survey = Survey.load()
    pres = survey.presentation(presentation)
    target = resolve(region, **({"saudi_variant": saudi_variant} if saudi_variant else {}))
    prefill = pres.prefill.rstrip()
    gap = pres.prefill[len(prefill):]  # the prefill's trailing space: the harness strips it from the context
    docs = []
    for item in survey.items:
        system, user = (m["content"] for m in pres.messages(item.id))
        docs.append({"item": item.id, "presentation": pres.name, "system": system, "text": user,
                     "gen_prefix": prefill, "choices": [gap + str(d) for d in ANSWERS],
                     "answers": [pres.digit_to_answer(d) for d in ANSWERS], "region": target.key,
                     "target": [target.scores.get(d, math.nan) for d in DIMENSIONS]})
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc, results):
    """The five choices' log-likelihoods -> the expected answer on the 1..5 scale (normalised over the options)."""
    lls = [r[0] if isinstance(r, (tuple, list)) else r for r in results]
    top = max(lls)
    probs = [math.exp(x - top) for x in lls]
    total = sum(probs)
    expected = sum(p / total * a for p, a in zip(probs, doc["answers"]))
    row = (doc["item"], expected, tuple(doc["target"]))
    return {"l1": row, **{d: row for d in DIMENSIONS}}


def indices(rows) -> dict[str, float]:
    """The six indices from (item, expected answer, target) rows (an item seen twice is averaged)."""
    sums: dict[int, list[float]] = {}
    for item, expected, _ in rows:
        sums.setdefault(item, []).append(expected)
    means = {i: sum(v) / len(v) for i, v in sums.items()}
    return Survey.load().indices(means, DEFAULT_CONSTANT)


def loss(rows) -> float:
    target = {d: t for d, t in zip(DIMENSIONS, rows[0][2]) if not math.isnan(t)}
    return l1_loss(indices(rows), target)


def agg_l1(rows):
    return loss(rows)


def _index(dim):
    def agg(rows):
        return indices(rows)[dim]
    agg.__name__ = f"agg_{dim}"
    return agg


agg_PDI, agg_IDV, agg_MAS, agg_UAI, agg_LTO, agg_IVR = (_index(d) for d in DIMENSIONS)
