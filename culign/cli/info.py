"""What culign knows before any model loads: the regions and their Hofstede scores, the presentations and the split,
the embedded models."""
from __future__ import annotations

import json

import click

from ..survey import DIMENSIONS, ORDERS
from ..targets import DEFAULT_SAUDI_VARIANT, SAUDI_VARIANTS, TABLE, resolve
from .common import load_survey, make_split, readout_option, split_options

@click.command("regions")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--saudi-variant", type=click.Choice(list(SAUDI_VARIANTS)), default=DEFAULT_SAUDI_VARIANT,
              show_default=True, help="Which full row to show for Saudi Arabia.")
def regions_cmd(as_json: bool, saudi_variant: str):
    """List the regions with their Hofstede scores (Hofstede 6-D matrix, 2015-08-16).

    Outputs: a table (or JSON) on stdout.
    """
    rows = [resolve(t.code, saudi_variant=saudi_variant) if t.code == "SAU" else t for t in TABLE]
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in rows], indent=2))
        return
    click.echo(f"{'key':<5}{'code':<5}{'name':<24}" + "".join(f"{d:>5}" for d in DIMENSIONS))
    for t in rows:
        vals = "".join(f"{t.scores[d]:>5.0f}" if d in t.scores else f"{'-':>5}" for d in DIMENSIONS)
        click.echo(f"{t.key:<5}{t.code or '':<5}{t.name[:23]:<24}{vals}")
    click.echo("\n'-' = no published score: such a region is scored on the dimensions it has. Saudi Arabia: "
               f"variant '{saudi_variant}' (--saudi-variant).")


@click.command("presentations")
@split_options
@readout_option("Show the default split of this read-out (default: digit).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def presentations_cmd(train, heldout, validation, no_validation, wording_files, readout, as_json):
    """List the wordings, templates and orders, and the split: which presentations train, which validate and
    which are held out, family by family.

    A presentation is WORDING/TEMPLATE/ORDER, e.g. vsm/chat/asc. Outputs: a listing (or JSON) on stdout.
    """
    survey = load_survey(wording_files)
    split = make_split(train, heldout, validation, no_validation, readout=readout or "digit", wording_files=wording_files)
    if as_json:
        click.echo(json.dumps({
            "wordings": {n: {"title": w.title, "note": w.note, "source": w.source} for n, w in survey.wordings.items()},
            "templates": {n: {"note": t.note, "system": t.system, "prefill": t.prefill, "readout": t.readout}
                          for n, t in survey.templates.items()},
            "orders": list(ORDERS), "presentations": survey.presentation_names(), "split": split.to_dict(),
            "leaks": split.leaks()}, indent=2))
        return
    click.echo("wordings:")
    for n, w in survey.wordings.items():
        click.echo(f"  {n:<10} {w.title}: {w.note[:90]}{'...' if len(w.note) > 90 else ''}")
    click.echo("templates:")
    for n, t in survey.templates.items():
        click.echo(f"  {n:<16} [{t.readout}] {t.note}")
    click.echo(f"orders:\n  asc        digit k means answer k\n  desc       the scale renumbered: digit k means "
               f"answer 6-k\n\n{len(survey.presentation_names())} presentations (wording x template x order).\n")
    click.echo(f"train ({len(split.train)}): {', '.join(split.train)}")
    for role, fams in (("validation", split.validation), ("held-out", split.heldout)):
        for fam, names in fams.items():
            click.echo(f"{role} {fam} ({len(names)}): {', '.join(names)}")
    leaks = split.leaks()
    click.echo("\nsplit check: " + ("no validation or held-out family shares its wording, template or order with "
                                    "training" if not leaks else "; ".join(leaks)))


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json: bool):
    """List the embedded models (--model embedded:NAME): whether their wheels are installed and whether they are
    converted yet (the first use assembles and converts them into the model cache: seconds for SmolLM2, a minute
    or two for the 1.5B Qwen).

    Outputs: a table (or JSON) on stdout.
    """
    from ..model.embedded import cached_dir, catalogue, installed

    rows = [{"id": m.id, "default": m.default, "installed": installed(m),
             "converted": (cached_dir(m) / "config.json").exists(), "folder": str(cached_dir(m)),
             "gguf_mib": round(m.size / 2**20), "parts": len(m.parts), "licence": m.licence, "origin": m.origin,
             "install": m.install_hint()} for m in catalogue().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<42}{'installed':<11}{'converted':<11}{'GGUF MiB':>9}  licence")
    for r in rows:
        click.echo(f"{r['id'] + (' (default)' if r['default'] else ''):<42}{'yes' if r['installed'] else 'no':<11}"
                   f"{'yes' if r['converted'] else 'no':<11}{r['gguf_mib']:>9,}  {r['licence']}")
    for r in rows:
        if not r["installed"]:
            click.echo(f"\n{r['id']}: {r['install']}")
