"""The `culign` command line: eval, train, regions, adapters. Friendly errors live here and only here."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .survey import DIMENSIONS, PRESENTATIONS, persona_line
from .targets import SAUDI_VARIANTS, DEFAULT_SAUDI_VARIANT, Target, UnknownRegionError, parse_custom, resolve, TABLE

PRES_CHOICE = click.Choice(list(PRESENTATIONS))


def _target(region: str | None, target_spec: str | None, saudi_variant: str, name: str | None = None) -> Target:
    if bool(region) == bool(target_spec):
        raise click.UsageError("give exactly one of --region or --target")
    try:
        if target_spec:
            return parse_custom(target_spec, name or "custom")
        return resolve(region, saudi_variant=saudi_variant)
    except (UnknownRegionError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--target" if target_spec else "--region") from None


def _runtime(model, device, dtype):
    from .runtime import ModelLoadError, Runtime

    try:
        with _status(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}"):
            return Runtime.load(model, device=device, dtype=dtype)
    except (ModelLoadError, ValueError) as e:
        raise click.ClickException(str(e)) from None


class _status:
    """A one-line 'doing X ... done (1.2 s)' on stderr: long steps show they are alive."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        import time

        self.t0 = time.perf_counter()
        click.echo(f"{self.what} ...", err=True, nl=False)

    def __exit__(self, exc_type, *_):
        import time

        click.echo(f" {'done' if exc_type is None else 'failed'} ({time.perf_counter() - self.t0:.1f} s)", err=True)


def model_options(f):
    f = click.option("--dtype", default=None, help="bfloat16 | float32 | float16 | auto (default: bf16 on CPU/GPU, "
                     "~4x faster than fp32 for matmuls on this CPU). Env CULIGN_DTYPE.")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available). "
                     "Env CULIGN_DEVICE.")(f)
    f = click.option("--model", default=None, metavar="ID_OR_DIR",
                     help="HF hub id (from the local HF cache) or a local model folder, e.g. "
                          "meta-llama/Meta-Llama-3-8B-Instruct. Default: the embedded SmolLM2-135M-Instruct. "
                          "Env CULIGN_MODEL.")(f)
    return f


def target_options(f):
    f = click.option("--saudi-variant", type=click.Choice(list(SAUDI_VARIANTS)), default=DEFAULT_SAUDI_VARIANT,
                     show_default=True, help="Full score row for Saudi Arabia, whose 2015 matrix row has only LTO "
                     "and IVR: legacy Hofstede Insights 95/25/60/80/36/52 or Almutairi et al. 2020 "
                     "72/48/43/64/27/14.")(f)
    f = click.option("--target", "target_spec", default=None, metavar="DIM=N,...",
                     help="Custom target instead of a region, e.g. PDI=80,IDV=20,MAS=66 (partial targets score "
                          "only the dimensions given).")(f)
    f = click.option("--region", default=None, help="Hofstede code (USA), ISO-2 alias (US) or country name, "
                     "case-insensitive. `culign regions` lists them.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="culign")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (loading, rescans, ...).")
def main(verbose: bool):
    """Cultural alignment of a frozen LLM with soft prompts (Masoud et al., 2025).

    The frozen model answers Hofstede's VSM 2013 survey; its answers give six indices (PDI, IDV, MAS, UAI,
    LTO, IVR) compared with a region's published scores by L1 loss. `train` tunes a soft prompt with
    Differential Evolution (no gradients); `eval` measures a model, a persona prompt or an adapter.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command("regions")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--saudi-variant", type=click.Choice(list(SAUDI_VARIANTS)), default=DEFAULT_SAUDI_VARIANT,
              show_default=True, help="Which full row to show for Saudi Arabia.")
def regions_cmd(as_json: bool, saudi_variant: str):
    """List the regions with their Hofstede scores (Hofstede 6-D matrix, 2015-08-16)."""
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


@main.command("eval")
@target_options
@click.option("--adapter", "adapters", multiple=True, metavar="PATH|REGION[@V]",
              help="Score a trained soft prompt too: an adapter folder or a registry name (repeatable).")
@click.option("--adapters-dir", default="adapters", show_default=True, envvar="CULIGN_ADAPTERS",
              type=click.Path(file_okay=False, path_type=Path), help="The adapter registry.")
@click.option("--icl/--no-icl", default=False, help="Add the persona (in-context) baseline row: "
              f"'{persona_line('<country>')}'.")
@click.option("--presentation", "presentations", multiple=True, type=PRES_CHOICE,
              help="How items are put to the model (repeatable; answers are averaged). Default: standard.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(region, target_spec, saudi_variant, adapters, adapters_dir, icl, presentations, model, device, dtype,
             as_json):
    """Score the naive model (and the persona baseline, and adapters) on the VSM 2013 survey for a region."""
    from .report import Row, format_table
    from .scorer import SurveyScorer
    from .survey import Survey

    target = _target(region, target_spec, saudi_variant)
    presentations = list(presentations) or ["standard"]
    rt = _runtime(model, device, dtype)
    survey = Survey.load()
    loaded = [(name, _load_adapter(name, adapters_dir, rt)) for name in adapters]
    rows = []
    scorer = SurveyScorer(rt, survey, presentations)
    with _status("scoring the naive model"):
        rows.append(Row("naive", scorer.score(None)[0], target))
    if icl:
        with _status("scoring the persona (ICL) baseline"):
            persona = SurveyScorer(rt, survey, presentations, persona=target.display_name)
            rows.append(Row("icl", persona.score(None)[0], target, extra={"persona": persona_line(target.display_name)}))
    for name, adapter in loaded:
        with _status(f"scoring adapter {adapter.info.ref}"):
            rows.append(Row(adapter.info.ref, scorer.score(adapter.prompt.unsqueeze(0))[0], target,
                            extra={"adapter": str(adapter.info.path)}))
    if as_json:
        click.echo(json.dumps({"target": target.to_dict(), "model": rt.name, "presentations": presentations,
                               "dtype": str(rt.dtype).replace("torch.", ""), "rows": [r.to_dict() for r in rows]},
                              indent=2))
    else:
        click.echo(f"{target.name} ({target.key}) on {rt.name}, presentation(s): {', '.join(presentations)}\n")
        click.echo(format_table(target, rows))


def _load_adapter(name: str, adapters_dir: Path, rt):
    """An adapter folder path, or REGION[@VERSION] in the registry, loaded and checked against the model."""
    from .registry import Registry, RegistryError

    path = Path(name)
    try:
        if path.is_dir():
            registry, region, version = Registry(path.parent.parent), path.parent.name, int(path.name)
        else:
            region, _, v = name.partition("@")
            registry, version = Registry(adapters_dir), (int(v) if v else None)
        return registry.load(region, version, hidden_size=rt.hidden_size, base_fingerprint=rt.fingerprint)
    except (RegistryError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--adapter") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
