"""Reports: the one writer of the comparison table, report.json and its plots.

Everything here reads a :class:`~culign.evaluation.Comparison` (naive, persona, adapter rows on one split) and
what the search recorded; nothing here scores or computes a loss.
"""
from __future__ import annotations

import io
import json
import re
from typing import BinaryIO, Mapping, Sequence

from .evaluation import Comparison, Evaluation, family_mean
from .survey import DIMENSIONS, l1_loss
from .targets import Target
from .registry.format import verdict_of
from .verdict import NOT_JUDGED, judge

# one colour and line style per row kind, the same in every plot
STYLE = {"target": ("k", "-"), "naive": ("C0", "--"), "persona": ("C1", "-."), "adapter": ("C2", "-"),
         "other": ("C3", ":")}


def _kind(label: str) -> str:
    return label if label in ("naive", "persona") else "adapter"


def _fmt(v: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _order_reading(slope: float) -> str:
    """What an order slope says, in words (see evaluation.order_slope)."""
    if slope <= -0.5:
        how = ("it moves which digit the model picks, not what the answers mean: gains on ascending scales turn "
               "into losses on reversed ones")
    elif slope >= 0.5:
        how = "its moves follow the answer labels when the scale is reversed"
    else:
        how = "its moves on a reversed scale barely follow those on an ascending one"
    return f"index moves on the reversed scale / on the ascending one (+1 follows the labels, -1 the digit); {how}"


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
            wins, n = c.heldout_wins(r)
            lines.append(f"{r.label} held-out gain vs naive: " + ", ".join(parts)
                         + f"; lower loss than naive on {wins}/{n} held-out presentations")
        by_family = c.gain_kept_by_family(r)
        if by_family:
            lines.append(f"{r.label} gain kept per held-out family: "
                         + ", ".join(f"{f} {100 * v:.0f}%" for f, v in by_family.items()))
        slope = c.order_slope(r)
        if slope is not None:
            lines.append(f"{r.label} order slope {slope:+.2f}: {_order_reading(slope)}")
        if c.split.heldout:
            lines.append(f"{r.label} verdict: {judge(c, r).line()}")
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


def format_validity(checks: Mapping[str, Mapping]) -> str:
    """The validity block (culign.validity): per read-out the order slope, agreement, persona spread against the
    noise band, Kendall's tau with Hofstede, option mass and the verdict line. ``checks``: read-out -> a
    ValidityReport's ``summary()`` or ``to_dict()`` (as report.json and culign.json keep them)."""
    lines = ["validity (does an answer follow meaning and culture? culign validity --help says how it is measured):"]
    for readout, v in checks.items():
        tau = v.get("tau") or {}
        lines.append(f"  {readout:<6} order slope {_fmt(v.get('order_slope'), '+.2f')} (>= 0.5: follows the labels; "
                     f"-1: the position), agreement across wordings {_fmt(v.get('agreement'), '+.2f')} (>= 0.5), "
                     f"persona spread {_fmt(v.get('spread_mean'))} vs noise band {_fmt(v.get('noise_band_mean'))} "
                     f"(x{_fmt(v.get('spread_ratio'), '.2f')}, >= 1)")
        lines.append(f"  {'':<6} Kendall's tau with Hofstede {_fmt(v.get('tau_mean'), '+.2f')} (>= 0.3; "
                     + " ".join(f"{d} {_fmt(tau.get(d), '+.2f')}" for d in DIMENSIONS)
                     + f"), option mass {_fmt(v.get('option_mass'), '.2f')}")
        why = "; ".join(v.get("reasons") or [])
        lines.append(f"  {readout:<6} verdict: {v.get('verdict')}" + (f" ({why})" if why else ""))
    return "\n".join(lines)


def radar_chart(comparison: Comparison, out: io.BytesIO | BinaryIO, fmt: str = "png") -> None:
    """Target vs every row, on the training presentations (left) and the held-out ones (right), as PNG or SVG
    (each series a group with id ``series-<label>``, so a page or a test can find it)."""
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
        def plot(values, label, kind, key):
            color, ls = STYLE[kind]
            (line,) = ax.plot(angles + angles[:1], list(values) + [values[0]], color=color, linestyle=ls,
                              linewidth=2, label=label)
            line.set_gid(f"series-{re.sub(r'[^A-Za-z0-9_-]', '_', key)}-{title.split()[0]}")  # an SVG id

        plot([target.scores.get(d, np.nan) for d in DIMENSIONS], f"target ({target.key})", "target", "target")
        for r in comparison.rows:
            if get(r) is not None:  # an interrupted run's adapter has no held-out scores
                plot([get(r)[d] for d in DIMENSIONS], r.label, _kind(r.label), r.label)
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
    fig.savefig(out, dpi=100, format=fmt)
    plt.close(fig)


def loss_curve_chart(history: Sequence[Sequence[float]], comparison: Comparison, title: str,
                     out: io.BytesIO | BinaryIO, fmt: str = "png") -> None:
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
    fig.savefig(out, dpi=100, format=fmt)
    plt.close(fig)


def report_files(report: dict, comparison: Comparison, history: Sequence[Sequence[float]]) -> dict[str, bytes]:
    """Everything a run writes beside its adapter: report.json, radar.png, loss.png and report.html."""
    radar, curve = io.BytesIO(), io.BytesIO()
    radar_chart(comparison, radar)
    loss_curve_chart(history, comparison, _curve_title(report, comparison), curve)
    return {"report.json": json.dumps(report, indent=2, sort_keys=True).encode(),
            "radar.png": radar.getvalue(), "loss.png": curve.getvalue(),
            "report.html": html_report(report, comparison).encode()}


def _curve_title(report: Mapping, comparison: Comparison) -> str:
    return (f"{report.get('optimizer', 'de')} on {comparison.target.name} ({report.get('model', '')}, "
            f"seed {report.get('seed', '')})")


# ---------------------------------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{padding:.25em .7em;text-align:right;
border-bottom:1px solid #eee}th:first-child,td:first-child{text-align:left}.muted{color:#777}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;margin:1em 0}.ok{color:#1a7f37}
.bad{color:#b42318}svg{max-width:100%;height:auto}details{margin:.5em 0}code{background:#f5f5f5;padding:0 .2em}"""


def _svg(draw) -> str:
    buf = io.BytesIO()
    draw(buf)
    text = buf.getvalue().decode()
    return text[text.index("<svg"):]  # inline: no XML prolog or doctype inside the page


def _cell(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def html_report(report: Mapping, comparison: Comparison, title: str | None = None) -> str:
    """One self-contained page (inline SVG, no network): radar, per-index table, train / held-out losses with gain
    kept and the noise band, the loss curve and the provenance."""
    from html import escape as e

    c, t = comparison, comparison.target
    name = title or report.get("adapter") or f"{t.name} ({t.key})"
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>culign report: {e(name)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>culign report: {e(name)}</h1>",
           f"<p class=muted>{e(t.name)} ({e(t.key)}), target source: {e(t.source)}; model {e(str(report.get('model', '')))}"
           f", {e(str(report.get('dtype', '')))}; {len(c.split.train)} training, {len(c.split.validation_names)} "
           f"validation, {len(c.split.heldout_names)} held-out presentations</p>"]
    if report.get("forced_invalid"):
        out.append("<div class=banner><b>Trained with --force-invalid:</b> the read-out used follows position in "
                   "the validity check, so its answers are not known to carry a culture; this adapter's numbers are a "
                   "pipeline check, not an alignment.</div>")
    out.append(_verdict_html(report.get("verdict")))
    if report.get("validity"):
        out.append(f"<h2>Validity (read-out used: {e(str(report.get('readout', 'digit')))})</h2><pre>"
                   f"{e(format_validity(report['validity']))}</pre>")
    if report.get("interrupted"):
        out.append("<div class=banner><b>Interrupted run:</b> the search was stopped before its budget was spent; "
                   "the adapter holds the best prompt found so far.</div>")
    out.append("<h2>Indices</h2>")
    out.append(_svg(lambda buf: radar_chart(c, buf, fmt="svg")))
    out.append("<table><tr><th></th>" + "".join(f"<th>{d}</th>" for d in DIMENSIONS) + "</tr>")
    out.append("<tr><td>target</td>" + "".join(f"<td>{_cell(t.scores.get(d), '.0f')}</td>" for d in DIMENSIONS)
               + "</tr>")
    for r in c.rows:
        out.append(f"<tr><td>{e(r.label)} (training)</td>"
                   + "".join(f"<td>{r.train_indices[d]:.1f}</td>" for d in DIMENSIONS) + "</tr>")
        if r.heldout_indices is not None:
            out.append(f"<tr class=muted><td>{e(r.label)} (held-out)</td>"
                       + "".join(f"<td>{r.heldout_indices[d]:.1f}</td>" for d in DIMENSIONS) + "</tr>")
    band = c.noise_band()
    out.append("<tr class=muted><td>naive noise band (std)</td>" + "".join(f"<td>{band[d]:.1f}</td>" for d in DIMENSIONS)
               + "</tr></table>")
    out.append("<h2>Losses</h2><table><tr><th></th><th>train</th><th>validation</th><th>held-out</th>"
               "<th>gain kept</th><th>better than naive on</th><th>option mass</th></tr>")
    for r in c.rows:
        kept = None if r is c.naive else c.gain_kept(r)
        wins = "" if r is c.naive else "{}/{} held-out".format(*c.heldout_wins(r))
        out.append(f"<tr><td>{e(r.label)}</td><td>{r.train_loss:.2f}</td><td>{_cell(r.validation_loss, '.2f')}</td>"
                   f"<td>{_cell(r.heldout_loss, '.2f')}</td><td>{'-' if kept is None else f'{100 * kept:.0f}%'}</td>"
                   f"<td>{wins}</td><td>{r.option_mass:.2f}</td></tr>")
    out.append("</table>")
    if c.split.heldout:
        out.append("<table><tr><th>held-out family</th>" + "".join(f"<th>{e(r.label)}</th>" for r in c.rows)
                   + "<th>presentations</th></tr>")
        for fam, names in c.split.heldout.items():
            out.append(f"<tr><td>{e(fam)}</td>" + "".join(f"<td>{_cell(r.heldout_by_family.get(fam))}</td>"
                                                         for r in c.rows) + f"<td>{len(names)}</td></tr>")
        out.append("</table>")
    for r in c.rows[1:]:
        sig = c.significance(r)
        if sig:
            parts = [f"<span class={'ok' if v['significant'] else 'muted'}>{k} {v['gain']:+.1f}"
                     f"{'' if v['significant'] else ' (within the band)'}</span>" for k, v in sig.items()]
            out.append(f"<p>{e(r.label)}: held-out gain over naive: {', '.join(parts)}.</p>")
        by_family = c.gain_kept_by_family(r)
        if by_family:
            out.append(f"<p>{e(r.label)}: gain kept per held-out family: "
                       + ", ".join(f"{e(f)} {100 * v:.0f}%" for f, v in by_family.items()) + ".</p>")
        slope = c.order_slope(r)
        if slope is not None:
            out.append(f"<p>{e(r.label)}: order slope {slope:+.2f}: {e(_order_reading(slope))}.</p>")
    out.append("<p class=muted>L1 = mean |index - target| over the target's dimensions. Training loss: mean over "
               "the training presentations; validation and held-out: mean over families. Gain kept = (naive held-out"
               " - row held-out) / (naive train - row train). The noise band is the naive model's standard deviation "
               "across every presentation: a gain inside it is not told apart from a change of wording.</p>")
    history = report.get("history") or []
    if history:
        out.append("<h2>Search</h2>")
        out.append(_svg(lambda buf: loss_curve_chart(history, c, _curve_title(report, c), buf, fmt="svg")))
    out.append("<h2>Per presentation</h2><details><summary>L1 loss of every row on every presentation</summary>"
               "<table><tr><th>presentation</th><th>role</th>" + "".join(f"<th>{e(r.label)}</th>" for r in c.rows)
               + "</tr>")
    roles = {n: "train" for n in c.split.train}
    roles.update({n: f"validation {f}" for f, ns in c.split.validation.items() for n in ns})
    roles.update({n: f"held-out {f}" for f, ns in c.split.heldout.items() for n in ns})
    for n in c.split.all_names:
        out.append(f"<tr><td>{e(n)}</td><td>{e(roles.get(n, ''))}</td>"
                   + "".join(f"<td>{_cell(r.scores[n].loss if n in r.scores else None)}</td>" for r in c.rows)
                   + "</tr>")
    out.append("</table></details>")
    prov = {k: report.get(k) for k in ("model", "readout", "forced_invalid", "dtype", "device", "cpu", "optimizer", "robust", "seed", "evaluations",
                                       "presentation_evaluations", "generations", "search_wall_time_s",
                                       "wall_time_s", "selected_by", "persona", "constant", "interrupted")
            if report.get(k) is not None}
    settings = report.get("search") or report.get("de") or {}
    out.append("<h2>Provenance</h2><table>" + "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>"
                                                      for k, v in {**prov, **settings}.items()) + "</table>")
    out.append("</body></html>")
    return "\n".join(out)


def registry_html(entries: Sequence[tuple[str, Mapping, Comparison]], root: str) -> str:
    """One page for a whole registry: a summary row per adapter, then each adapter's radar."""
    from html import escape as e

    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>culign registry {e(root)}</title>"
           f"<style>{_CSS}</style></head><body><h1>culign registry: {e(root)}</h1>",
           "<table><tr><th>adapter</th><th>target</th><th>train</th><th>held-out</th><th>naive held-out</th>"
           "<th>gain kept</th><th>verdict</th><th>optimizer</th><th>training presentations</th><th></th></tr>"]
    for ref, report, c in entries:
        row = c.rows[-1]
        kept = c.gain_kept(row)
        out.append(f"<tr><td><a href='#{e(ref)}'>{e(ref)}</a></td><td>{e(c.target.key)}</td>"
                   f"<td>{row.train_loss:.2f}</td><td>{_cell(row.heldout_loss, '.2f')}</td>"
                   f"<td>{_cell(c.naive.heldout_loss, '.2f')}</td>"
                   f"<td>{'-' if kept is None else f'{100 * kept:.0f}%'}</td>"
                   f"<td>{e(verdict_of(report))}</td><td>{e(str(report.get('optimizer', 'de')))}</td>"
                   f"<td>{len(c.split.train)}</td>"
                   f"<td>{'<b>interrupted</b>' if report.get('interrupted') else ''}</td></tr>")
    out.append("</table>")
    for ref, report, c in entries:
        out.append(f"<h2 id='{e(ref)}'>{e(ref)}</h2>")
        out.append(_svg(lambda buf, c=c: radar_chart(c, buf, fmt="svg")))
    out.append("</body></html>")
    return "\n".join(out)


def paper_table(entries: Sequence[tuple[str, Mapping, Comparison]]) -> str:
    """The seed paper's table, in Markdown, for a set of adapters (`culign report --table`): per adapter the rows
    naive / persona / DE with the L1 on the training presentations, on each held-out family, and over all held-out
    ones, then the naive model's noise band, the gain kept, the order slope and the verdict. The persona line is
    judged by the same rule (culign.verdict) as the adapter: the baseline gets no easier bar."""
    families: list[str] = []
    for _, _, c in entries:
        families += [f for f in c.split.heldout if f not in families]
    head = ["adapter", "row", "train L1", *(f"held-out {f}" for f in families), "held-out L1", "band", "gain kept",
            "order slope", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"])
             + " |"]
    for ref, report, c in entries:
        band = c.noise_band()["L1"]
        for row in c.rows:
            naive = row is c.naive
            kind = _kind(row.label)
            if kind == "adapter":  # the trained row: named by its optimiser, its verdict the one it was saved with
                kind, verdict = str(report.get("optimizer", "de")).upper(), verdict_of(report)
            else:
                verdict = "" if naive else judge(c, row).verdict
            kept = None if naive else c.gain_kept(row)
            by_family = row.heldout_by_family
            cells = [ref if naive else "", kind, _fmt(row.train_loss, ".2f"),
                     *(_fmt(by_family.get(f), ".2f") for f in families), _fmt(row.heldout_loss, ".2f"),
                     _fmt(band, ".2f") if naive else "", "" if naive else _fmt(kept, ".0%"),
                     "" if naive else _fmt(c.order_slope(row), "+.2f"), verdict]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_table(entries: Sequence[tuple[str, Mapping, Comparison]]) -> str:
    """Is an adapter its region's, or a move any target likes? (`culign report --cross`). Every persona and DE row
    of every adapter scored against every adapter's target: the held-out L1 (mean of the families' means, as the
    report), from the answers the reports hold (nothing is scored again). An adapter that carries its region is
    best on its own target; one that carries a shift every target likes is best on several. Bold: the best DE row
    of a column. The last line counts the DE adapters best on their own target."""
    if len(entries) < 2:
        raise ValueError(f"a cross table needs the reports of two regions or more; got {len(entries)}")
    models = {str(report.get("model")) for _, report, _ in entries}
    if len(models) > 1:  # the naive row and every comparison assume one frozen model
        raise ValueError(f"the adapters were trained on different models ({', '.join(sorted(models))}): "
                         "compare the adapters of one model (one registry per model)")
    targets = [(ref, c.target) for ref, _, c in entries]
    lines = ["| row | " + " | ".join(f"target {t.key} ({ref})" for ref, t in targets) + " |",
             "| --- |" + " ---: |" * len(targets)]

    def heldout(row: Evaluation, c: Comparison, target: Target) -> float | None:
        return family_mean(row.scores, c.split.heldout, lambda s: l1_loss(s.indices, target.scores))[0]

    de = [[heldout(c.rows[-1], c, t) for _, t in targets] for _, _, c in entries]
    best = [min(range(len(de)), key=lambda i, j=j: _inf(de[i][j])) for j in range(len(targets))]
    first = entries[0][2]
    naive = [heldout(first.naive, first, t) for _, t in targets]
    lines.append(f"| naive (of {entries[0][0]}) | " + " | ".join(_fmt(v, ".2f") for v in naive) + " |")
    for i, (ref, report, c) in enumerate(entries):
        for row in c.rows[1:]:
            trained = row is c.rows[-1]
            kind = str(report.get("optimizer", "de")).upper() if trained else _kind(row.label)
            cells = de[i] if trained else [heldout(row, c, t) for _, t in targets]
            shown = [f"**{_fmt(v, '.2f')}**" if trained and best[j] == i else _fmt(v, ".2f")
                     for j, v in enumerate(cells)]
            lines.append(f"| {ref} {kind} | " + " | ".join(shown) + " |")
    own = sum(best[i] == i for i in range(len(entries)))
    lines.append(f"\nDE adapters best on their own target: {own} of {len(entries)} (held-out presentations; "
                 "the naive row is the first report's: without a prompt the model answers alike whatever the target).")
    return "\n".join(lines)


def _inf(v: float | None) -> float:
    return float("inf") if v is None else v


def _verdict_html(v: Mapping | None) -> str:
    """The recorded verdict with its numbers: per held-out family the L1 gain over naive against the noise band."""
    from html import escape as e

    if not isinstance(v, Mapping):
        return f"<h2>Verdict: {NOT_JUDGED}</h2><p class=muted>saved before culign judged adapters.</p>"
    why = "; ".join(v.get("reasons") or [])
    out = [f"<h2>Verdict: <span class={'ok' if v.get('aligned') else 'bad'}>{e(str(v.get('verdict')))}</span></h2>"
           + (f"<p>{e(why)}</p>" if why else ""),
           "<table><tr><th>held-out family</th><th>L1 gain over naive</th><th>noise band</th><th>shown</th></tr>"]
    for fam, f in (v.get("families") or {}).items():
        out.append(f"<tr><td>{e(fam)}</td><td>{_cell(f.get('gain'), '+.2f')}</td><td>{_cell(v.get('band'), '.2f')}"
                   f"</td><td>{'yes' if f.get('shown') else 'no'}</td></tr>")
    out.append(f"</table><p class=muted>order slope {_cell(v.get('order_slope'), '+.2f')}; thresholds "
               f"{e(json.dumps(v.get('thresholds', {})))} (docs/method.md, \"The post-training verdict\").</p>")
    return "\n".join(out)


def row_summary(row: Evaluation, comparison: Comparison) -> dict:
    """The headline numbers of one row, for provenance and `culign adapters list`."""
    return {"train_loss": row.train_loss, "validation_loss": row.validation_loss, "heldout_loss": row.heldout_loss,
            "heldout_by_family": row.heldout_by_family, "gain_kept": comparison.gain_kept(row),
            "option_mass": row.option_mass}


def describe_target(target: Target) -> str:
    return f"{target.name} ({target.key})"
