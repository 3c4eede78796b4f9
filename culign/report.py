"""Reports: the one writer of the comparison table, report.json and its plots.

Everything here reads a :class:`~culign.evaluation.Comparison` (naive, persona, adapter rows on one split) and
what the search recorded; nothing here scores or computes a loss.
"""
from __future__ import annotations

import io
import json
from typing import BinaryIO, Mapping, Sequence

from .evaluation import Comparison, Evaluation
from .survey import DIMENSIONS
from .targets import Target

# one colour and line style per row kind, the same in every plot
STYLE = {"target": ("k", "-"), "naive": ("C0", "--"), "persona": ("C1", "-."), "adapter": ("C2", "-"),
         "other": ("C3", ":")}


def _kind(label: str) -> str:
    return label if label in ("naive", "persona") else "adapter"


def _fmt(v: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def format_table(comparison: Comparison, seen_range: Mapping[str, Sequence[float]] | None = None) -> str:
    """Fixed-width table: per row the training indices, train / validation / held-out loss, gain kept, option mass;
    then held-out loss per family, the naive model's noise band and which held-out gains stand out of it."""
    c, t = comparison, comparison.target
    head = (f"{'':<12}" + "".join(f"{d:>7}" for d in DIMENSIONS) + f"{'train':>8}{'valid':>8}{'held-out':>10}"
            f"{'kept':>7}{'mass':>7}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'target':<12}" + "".join(f"{t.scores[d]:>7.0f}" if d in t.scores else f"{'n/a':>7}"
                                            for d in DIMENSIONS))
    for r in c.rows:
        ind = r.train_indices
        kept = None if r is c.naive else c.gain_kept(r)
        lines.append(f"{r.label[:12]:<12}" + "".join(f"{ind[d]:>7.1f}" for d in DIMENSIONS)
                     + f"{r.train_loss:>8.1f}{_fmt(r.validation_loss):>8}{_fmt(r.heldout_loss):>10}"
                     + f"{_fmt(None if kept is None else 100 * kept, '.0f') + ('%' if kept is not None else ''):>7}"
                     + f"{r.option_mass:>7.2f}")
        if r.heldout_indices is not None:
            hi = r.heldout_indices
            lines.append(f"{'  held-out':<12}" + "".join(f"{hi[d]:>7.1f}" for d in DIMENSIONS))
    if seen_range:
        lines.append(f"{'search saw':<12}" + "".join(f"{f'{seen_range[d][0]:.0f}-{seen_range[d][1]:.0f}':>7}"
                                                    for d in DIMENSIONS))
    fams = list(c.split.heldout)
    if fams:
        lines.append("")
        lines.append(f"{'held-out family':<22}" + "".join(f"{r.label[:10]:>11}" for r in c.rows)
                     + f"{'presentations':>15}")
        for fam in fams:
            lines.append(f"{fam:<22}" + "".join(f"{_fmt(r.heldout_by_family.get(fam)):>11}" for r in c.rows)
                         + f"{len(c.split.heldout[fam]):>15}")
    band = c.noise_band()
    lines.append("")
    lines.append(f"noise band (naive model, std over {len(c.naive.scores)} presentations): "
                 + " ".join(f"{d} {band[d]:.1f}" for d in DIMENSIONS) + f"; L1 {band['L1']:.1f}")
    for r in c.rows[1:]:
        sig = c.significance(r)
        if sig:
            parts = [f"{k} {v['gain']:+.1f}{'' if v['significant'] else ' (n.s.)'}" for k, v in sig.items()]
            lines.append(f"{r.label} held-out gain vs naive: " + ", ".join(parts))
    if seen_range:
        outside = []
        for d in DIMENSIONS:
            lo, hi = seen_range[d]
            v = t.scores.get(d)
            if v is not None and not lo <= v <= hi:
                outside.append(f"{d} {v:.0f} ({'min' if v < lo else 'max'} seen {lo if v < lo else hi:.0f})")
        if outside:
            lines.append(f"note: targets outside what any evaluated prompt gave: {', '.join(outside)}")
    if t.missing:
        lines.append(f"note: {t.name} has no published score for {', '.join(t.missing)}; "
                     "the loss covers only the other dimensions")
    lines.append("L1 = mean |index - target| over the target's dimensions. train = mean over the training "
                 "presentations; valid / held-out = mean over families. kept = gain kept: (naive held-out - "
                 "row held-out) / (naive train - row train). (n.s.) = a gain inside the naive noise band. "
                 "mass = probability on the option digits.")
    return "\n".join(lines)


def radar_chart(comparison: Comparison, out: io.BytesIO | BinaryIO) -> None:
    """Target vs every row, on the training presentations (left) and the held-out ones (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt
    import numpy as np

    target = comparison.target
    angles = np.linspace(0, 2 * np.pi, len(DIMENSIONS), endpoint=False).tolist()
    sides = [("training presentations", lambda r: r.train_indices)]
    if comparison.naive.heldout_indices is not None:
        sides.append(("held-out presentations", lambda r: r.heldout_indices))
    fig, axes = plt.subplots(1, len(sides), figsize=(5.2 * len(sides), 5.6), subplot_kw={"polar": True})
    axes = np.atleast_1d(axes)
    for ax, (title, get) in zip(axes, sides):
        def plot(values, label, kind):
            color, ls = STYLE[kind]
            ax.plot(angles + angles[:1], list(values) + [values[0]], color=color, linestyle=ls, linewidth=2,
                    label=label)

        plot([target.scores.get(d, np.nan) for d in DIMENSIONS], f"target ({target.key})", "target")
        for r in comparison.rows:
            plot([get(r)[d] for d in DIMENSIONS], r.label, _kind(r.label))
        ax.set_xticks(angles, DIMENSIONS, fontsize=11, fontweight="bold")
        ax.tick_params(axis="x", pad=12)  # the labels sit outside the outer ring, clear of the lines
        ax.set_ylim(0, 110)
        ax.set_yticks([25, 50, 75, 100], ["25", "50", "75", "100"], fontsize=7, color="0.45")
        ax.set_rlabel_position(90 / len(DIMENSIONS))  # radial labels between two axes, not on one
        ax.set_title(title, pad=22)
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5 if len(sides) == 1 else -0.1, -0.08),
                    ncol=len(comparison.rows) + 1, fontsize=9, frameon=False)
    fig.suptitle(f"Hofstede indices: {target.name}", fontsize=13)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def loss_curve_chart(history: Sequence[Sequence[float]], comparison: Comparison, title: str,
                     out: io.BytesIO | BinaryIO) -> None:
    """The best elite's training objective against candidate evaluations, with the baselines' training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    color, ls = STYLE["adapter"]
    if history:
        ax.step([h[0] for h in history], [h[1] for h in history], where="post", color=color, linestyle=ls,
                label="search: best on all training presentations")
    for r in comparison.rows:
        if r.label in ("naive", "persona"):
            color, ls = STYLE[r.label]
            ax.axhline(r.train_loss, color=color, linestyle=ls, label=f"{r.label} ({r.train_loss:.1f})")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("L1 loss (training presentations)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def report_files(report: dict, comparison: Comparison, history: Sequence[Sequence[float]]) -> dict[str, bytes]:
    """Everything a run writes beside its adapter: report.json, radar.png, loss.png."""
    radar, curve = io.BytesIO(), io.BytesIO()
    radar_chart(comparison, radar)
    loss_curve_chart(history, comparison, f"{report.get('optimizer', 'search')} on {comparison.target.name} "
                     f"({report.get('model', '')}, seed {report.get('seed', '')})", curve)
    return {"report.json": json.dumps(report, indent=2, sort_keys=True).encode(),
            "radar.png": radar.getvalue(), "loss.png": curve.getvalue()}


def row_summary(row: Evaluation, comparison: Comparison) -> dict:
    """The headline numbers of one row, for provenance and `culign adapters list`."""
    return {"train_loss": row.train_loss, "validation_loss": row.validation_loss, "heldout_loss": row.heldout_loss,
            "heldout_by_family": row.heldout_by_family, "gain_kept": comparison.gain_kept(row),
            "option_mass": row.option_mass}


def describe_target(target: Target) -> str:
    return f"{target.name} ({target.key})"
