"""The post-training verdict: is a trained adapter an alignment? One pure function of a Comparison's numbers.

:mod:`culign.validity` judges a model *before* training (can its answers carry a culture?); :func:`judge` judges a
prompt *after* it (did its gain over the naive model hold on presentations the search never saw, beyond what a
change of presentation alone does, and do its moves keep their meaning when the scale is reversed?). Its home is
this module, not evaluation.py, because evaluation measures and this decides: the thresholds below are a choice,
written down once (docs/method.md, "The post-training verdict"), and the numbers every report prints stay free of
it, as validity's ``judge()`` sits apart from its statistics. It reads only a :class:`Comparison` and reuses
validity's SLOPE_MIN, so the gate before training and the verdict after it draw the same line. The registry, the
report and the server read its words from the adapter's provenance (``verdict``); nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .evaluation import Comparison, Evaluation
from .validity import POSITION, SLOPE_MIN

# Thresholds, fixed before any result of a model whose answers follow meaning existed; never tuned so that an adapter
# passes (docs/method.md says the same at more length).
GAIN_MIN_BANDS = 1.0  # a held-out family's L1 gain over the naive model must exceed 1 x the naive model's L1 noise
# band (its std across every presentation of the split): less is what a change of wording, template or order alone
# does to the naive model. The rule Comparison.significance marks (n.s.) and validity's SPREAD_MIN apply.
FAMILY_SHARE = 1.0  # the share of held-out families that must show it: all of them. Each family is one kind of
# presentation the search never saw (a wording, a template, the reversed scale, all at once); "aligned on held-out
# presentations" claims every kind, and a gain that holds on some only is reported as not shown, naming the others.
# SLOPE_MIN (validity: 0.5): the adapter's own moves (against the naive model) on a reversed scale must keep at least
# half their size in the direction the labels say. Gated wherever a presentation was scored in both orders, also
# after order-balanced training (the held-out wordings and templates then carry both orders): stricter never lets a
# position-following prompt pass.

ALIGNED = "aligned on held-out presentations"
NOT_SHOWN = "gain not shown"
# POSITION = validity.POSITION, "follows position"
NOT_JUDGED = "not judged"  # also what an adapter saved before verdicts existed shows (registry.AdapterInfo.verdict)


@dataclass(frozen=True)
class Verdict:
    """One row's verdict, the reasons (empty when aligned) and the numbers behind it."""
    verdict: str
    reasons: tuple[str, ...]
    band: float  # the naive model's L1 noise band
    families: Mapping[str, Mapping] = field(default_factory=dict)  # held-out family -> gain (L1, None: not scored), shown
    order_slope: float | None = None

    @property
    def aligned(self) -> bool:
        return self.verdict == ALIGNED

    def line(self) -> str:
        return self.verdict + (f" ({'; '.join(self.reasons)})" if self.reasons else "")

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "aligned": self.aligned, "reasons": list(self.reasons), "band": self.band,
                "families": {f: dict(v) for f, v in self.families.items()}, "order_slope": self.order_slope,
                "thresholds": thresholds()}


def thresholds() -> dict:
    return {"gain_min_bands": GAIN_MIN_BANDS, "family_share": FAMILY_SHARE, "order_slope": SLOPE_MIN}


def judge(comparison: Comparison, row: Evaluation) -> Verdict:
    """``row``'s verdict against ``comparison``'s naive row, on the split's held-out families.

    In order: :data:`NOT_JUDGED` when no held-out family was scored (an interrupted run, a split without held-out);
    :data:`POSITION` when the order slope is below SLOPE_MIN (a gain in position is no gain in meaning, whatever
    the families say); :data:`NOT_SHOWN` when fewer than FAMILY_SHARE of the families gain more than GAIN_MIN_BANDS
    noise bands (a family not scored counts as not shown); :data:`NOT_JUDGED` when nothing was scored in both scale
    orders (meaning cannot be told from position); else :data:`ALIGNED`."""
    band = comparison.noise_band()["L1"]
    naive, mine = comparison.naive.heldout_by_family, row.heldout_by_family
    families = {}
    for fam in comparison.split.heldout:
        gain = naive[fam] - mine[fam] if fam in naive and fam in mine else None
        families[fam] = {"gain": gain, "shown": gain is not None and gain > GAIN_MIN_BANDS * band}
    slope = comparison.order_slope(row)

    def out(verdict: str, *why: str) -> Verdict:
        return Verdict(verdict, why, band, families, slope)

    if not any(f["gain"] is not None for f in families.values()):
        return out(NOT_JUDGED, "no held-out presentation scored: nothing shows whether the gain transfers")
    if slope is not None and slope < SLOPE_MIN:
        return out(POSITION, f"order slope {slope:+.2f} < {SLOPE_MIN}: its moves on a reversed scale do not keep "
                             "their meaning")
    short = [f"{fam} not scored" if f["gain"] is None else
             f"{fam} gain {f['gain']:+.2f} <= {GAIN_MIN_BANDS:g} x noise band {band:.2f}"
             for fam, f in families.items() if not f["shown"]]
    if len(families) - len(short) < FAMILY_SHARE * len(families):
        return out(NOT_SHOWN, *short)
    if slope is None:
        return out(NOT_JUDGED, "no presentation scored in both scale orders: following meaning cannot be told "
                               "from following position")
    return out(ALIGNED)
