"""Measuring a model: `culign validity` (does its answer follow meaning?) and `culign eval` (naive, persona, adapters)."""
from __future__ import annotations

import json

import click

from ..survey import READOUTS, persona_line
from .common import (SPLIT_HINT, load_adapter, load_runtime, load_survey, model_options, parse_target, readout_option,
                     registry_dir, registry_option, split_args, split_options, target_options, validity_checks,
                     validity_text)

@click.command("validity")
@click.option("--readout", type=click.Choice([*READOUTS, "all"]), default="all", show_default=True,
              help="Which read-out to check: digit (the option symbol after the prefill), label (each option's "
                   "label text scored as the continuation) or all.")
@click.option("--no-cache", is_flag=True, help="Measure again even when a cached result exists (and store it).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every number, per presentation).")
def validity_cmd(readout, no_cache, progress, model, device, dtype, as_json):
    """Does the model's answer follow meaning and culture? Checked per read-out, before anything is trained.

    The bare model and persona lines for a fixed panel of 8 countries (United States, China, India, Japan, Sweden,
    Germany, Brazil, Russia) answer the survey in 2 wordings x both scale orders. Measured: the order slope
    (persona moves on the reversed scale against the ascending one: +1 follows the labels, -1 the position),
    agreement of the countries' differences across the two wordings (correlation), the persona spread across the
    panel against the bare model's noise band, Kendall's tau between the panel's indices and Hofstede's scores, and
    the option mass. Verdict per read-out: "follows meaning and culture", "follows position" or "no cultural
    signal"; the thresholds and why they are where they are: docs/method.md, "Is the model's answer valid?".

    Cached per model, read-out and culign version (~/.cache/culign/validity); `culign train` reads the cache and
    trains on a read-out that passes or, with a warning, on one that follows meaning (the order slope) without a
    culture shown; never on one that follows position (unless --force-invalid). Outputs: the numbers and verdicts
    (or JSON) on stdout.
    """
    from .. import validity

    rt = load_runtime(model, device, dtype)
    readouts = list(READOUTS) if readout == "all" else [readout]
    checks = validity_checks(rt, readouts, use_cache=not no_cache, progress=progress)
    if as_json:
        click.echo(json.dumps({r: {**v.to_dict(), "from_cache": v.from_cache} for r, v in checks.items()}, indent=2))
        return
    first = next(iter(checks.values()))
    click.echo(f"{rt.name}: {len(first.panel)} persona countries ({', '.join(first.panel)}) and the bare model")
    for r, v in checks.items():
        click.echo(f"  {r}: {', '.join(v.presentations)} ({validity.steps(r)} presentation-evaluations, "
                   f"{v.wall_time_s:.0f} s{', from the cache' if v.from_cache else ''}"
                   f"{'; ' + v.environment['cpu'] if v.environment.get('cpu') else ''})")
    click.echo(validity_text(checks))
    if not any(v.passes for v in checks.values()):
        meaning = [r for r, v in checks.items() if validity.trainable(v)]
        if meaning:  # the gate (validity.trainable): follows meaning, no culture shown -> trains, with a warning
            click.echo(f"\nno read-out passes, but {', '.join(meaning)} follows meaning: `culign train` trains on it "
                       "(order-balanced, with a warning); only the post-training verdict can call the result an "
                       "alignment.")
        else:
            click.echo("\nno read-out passes and none follows meaning: this model's answers are not known to carry a "
                       "culture, and `culign train` refuses to train on it (exit 2) unless given --force-invalid.")


@click.command("eval")
@target_options
@click.option("--adapter", "adapters", multiple=True, metavar="PATH|REGION[@V]",
              help="Score a trained soft prompt too: an adapter folder or a registry name (repeatable).")
@registry_option
@click.option("--icl/--no-icl", default=False, help="Add the persona (in-context) baseline row: "
              f"'{persona_line('<country>')}'.")
@click.option("--presentation", "presentations", multiple=True, metavar="PRESENTATION",
              help="Score only these presentations (names or patterns; repeatable); no held-out columns then.")
@readout_option("digit: the option symbol after the prefill; label: each option's label text scored as the "
                "continuation (its own templates, options without digits). Picks the default split. Default: the "
                "(first) adapter's read-out, else the one the named presentations are written for, else digit.")
@click.option("--validity/--no-validity", default=True, help="Show the model's validity check for the read-out "
              "(from the cache; measured first when absent, a few minutes on a CPU).")
@split_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(region, target_spec, saudi_variant, adapters, adapters_dir, icl, presentations, readout, validity,
             train, heldout, validation, no_validation, wording_files, model, device, dtype, as_json):
    """Score the naive model (and the persona baseline, and adapters) on the VSM 2013 survey for a region.

    Each row is scored on every presentation of the split: training, validation and held-out losses, gain kept
    and the naive model's noise band, exactly as `culign train` reports them. With --adapter and no split options,
    the split is the one the (first) adapter was trained on. Outputs: a table (or JSON) on stdout.
    """
    from .. import api
    from ..report import format_table

    target = parse_target(region, target_spec, saudi_variant)
    load_survey(wording_files)  # a bad wording file is named before the model loads
    rt = load_runtime(model, device, dtype)
    loaded = [load_adapter(name, registry_dir(adapters_dir), rt) for name in adapters]
    try:
        result = api.evaluate(target, model=rt, adapters=loaded, persona=icl, presentations=presentations,
                              readout=readout, validity=validity, progress=not as_json,
                              **split_args(train, heldout, validation, no_validation, wording_files))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--presentation" if presentations else SPLIT_HINT) from None
    split = result.split
    if as_json:
        d = result.to_dict()
        click.echo(json.dumps({**d, "presentations": split.all_names, "rows": [d["rows"][r.label] for r in
                                                                                result.rows]}, indent=2))
    else:
        click.echo(f"{target.name} ({target.key}) on {rt.name}, {result.readout} read-out: {len(split.train)} "
                   f"training, {len(split.validation_names)} validation, {len(split.heldout_names)} held-out "
                   "presentation(s)\n")
        click.echo(format_table(result.comparison))
        if result.validity:
            click.echo("\n" + validity_text(result.validity))
