"""Comparison reports: target vs naive vs persona (ICL) vs soft-prompt rows, as a table, JSON and a radar chart."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

from .survey import DIMENSIONS, SurveyResult, l1_loss
from .targets import Target


@dataclass
class Row:
    label: str
    result: SurveyResult
    target: Target
    heldout: SurveyResult | None = None  # the same respondent on presentations it was not trained on
    extra: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return l1_loss(self.result.indices, self.target.scores)

    @property
    def heldout_loss(self) -> float | None:
        return None if self.heldout is None else l1_loss(self.heldout.indices, self.target.scores)

    def to_dict(self) -> dict:
        d = {"label": self.label, "loss": self.loss,
             "errors": {k: self.result.indices[k] - v for k, v in self.target.scores.items()},
             **self.result.to_dict(), **self.extra}
        if self.heldout is not None:
            d["heldout_loss"] = self.heldout_loss
            d["heldout"] = self.heldout.to_dict()
        return d


def format_table(target: Target, rows: Sequence[Row], seen_range: dict[str, list[float]] | None = None) -> str:
    """Fixed-width table: one line per row with the six indices, L1 loss, option mass and item spread; with
    ``seen_range`` (index -> [min, max] over every prompt DE evaluated) also what DE could reach."""
    head = f"{'':<12}" + "".join(f"{d:>7}" for d in DIMENSIONS) + f"{'L1':>8}{'held-out':>10}{'mass':>7}{'spread':>8}"
    lines = [head, "-" * len(head)]
    tgt = "".join(f"{target.scores[d]:>7.0f}" if d in target.scores else f"{'n/a':>7}" for d in DIMENSIONS)
    lines.append(f"{'target':<12}{tgt}")
    for r in rows:
        vals = "".join(f"{r.result.indices[d]:>7.1f}" for d in DIMENSIONS)
        held = f"{r.heldout_loss:>10.1f}" if r.heldout is not None else f"{'':>10}"
        lines.append(f"{r.label:<12}{vals}{r.loss:>8.1f}{held}{r.result.option_mass:>7.2f}{r.result.item_std:>8.2f}")
        errs = "".join(f"{r.result.indices[d] - target.scores[d]:>+7.1f}" if d in target.scores else f"{'':>7}"
                       for d in DIMENSIONS)
        lines.append(f"{'  error':<12}{errs}")
    if seen_range:
        lines.append(f"{'DE reached':<12}" + "".join(f"{f'{seen_range[d][0]:.0f}-{seen_range[d][1]:.0f}':>7}"
                                                    for d in DIMENSIONS))
        outside = []
        for d in DIMENSIONS:
            lo, hi = seen_range[d]
            t = target.scores.get(d)
            if t is not None and not lo <= t <= hi:
                outside.append(f"{d} {t:.0f} ({'min' if t < lo else 'max'} reached {lo if t < lo else hi:.0f})")
        if outside:
            lines.append(f"note: targets outside what any evaluated prompt gave: {', '.join(outside)}; more budget "
                         "widens that range only slowly")
    if target.missing:
        lines.append(f"note: {target.name} has no published score for {', '.join(target.missing)}; "
                     "the loss covers only the other dimensions")
    lines.append("L1 = mean |index - target| over the target's dimensions; mass = probability on the option tokens; "
                 "spread = std of the 24 answers")
    return "\n".join(lines)


def radar_chart(target: Target, rows: Sequence[Row], out: Path | BinaryIO) -> None:
    """Target vs each row on the six dimensions, written as a PNG (to a path or a binary stream)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt
    import numpy as np

    angles = np.linspace(0, 2 * np.pi, len(DIMENSIONS), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), subplot_kw={"polar": True})

    def plot(values, label, style):
        v = list(values) + [values[0]]
        ax.plot(angles + angles[:1], v, style, label=label, linewidth=2)

    plot([target.scores.get(d, np.nan) for d in DIMENSIONS], f"target ({target.key})", "k-")
    for r, style in zip(rows, ["C0--", "C1-.", "C2-", "C3:", "C4-"]):
        plot([r.result.indices[d] for d in DIMENSIONS], f"{r.label} (L1 {r.loss:.1f})", style)
    ax.set_xticks(angles, DIMENSIONS)
    ax.set_ylim(0, 110)
    ax.set_title(f"Hofstede indices: {target.name}")
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def loss_curve_chart(history: Sequence[Sequence[float]], baselines: dict[str, float], title: str,
                     out: Path | BinaryIO) -> None:
    """Best loss after each DE generation against evaluations, with the baselines as horizontal lines (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if history:
        ax.step([h[0] for h in history], [h[1] for h in history], where="post", label="DE best", color="C2")
    for (label, value), style in zip(baselines.items(), ["C0--", "C1-."]):
        ax.axhline(value, linestyle=style[2:], color=style[:2], label=f"{label} ({value:.1f})")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("L1 loss (training presentations)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
