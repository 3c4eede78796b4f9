"""The `culign` command line: eval, train, regions, adapters. Friendly errors live here and only here."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .optimize import STRATEGIES as _STRATEGIES, DEConfig
from .survey import DIMENSIONS, PRESENTATIONS, persona_line
from .targets import SAUDI_VARIANTS, DEFAULT_SAUDI_VARIANT, Target, UnknownRegionError, parse_custom, resolve, TABLE

PRES_CHOICE = click.Choice(list(PRESENTATIONS))
_DE = DEConfig()  # the train command's defaults are DEConfig's, stated once


def _target(region: str | None, target_spec: str | None, saudi_variant: str, name: str | None = None) -> Target:
    if bool(region) == bool(target_spec):
        raise click.UsageError("give exactly one of --region or --target")
    try:
        if target_spec:
            return parse_custom(target_spec, name or "custom")
        return resolve(region, saudi_variant=saudi_variant)
    except (UnknownRegionError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--target" if target_spec else "--region") from None


def _runtime(model, device, dtype, scoring: bool = True):
    from .runtime import ModelLoadError, Runtime

    try:
        with _status(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}"):
            return Runtime.load(model, device=device, dtype=dtype, scoring=scoring)
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
    f = click.option("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: float32. bf16 is "
                     "faster, but its rounding moves the indices by 1-3 points, as much as a soft prompt's effect, "
                     "and DE then tunes to the noise). Env CULIGN_DTYPE.")(f)
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


def _floats(text: str) -> tuple[float, float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected LO,HI numbers, got {text!r}", param_hint="--mutation") from None
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2:
        raise click.BadParameter(f"expected LO,HI, got {text!r}", param_hint="--mutation")
    return vals  # type: ignore[return-value]


@main.command("train")
@target_options
@click.option("--name", default=None, help="Registry name for a --target run (default: custom).")
@click.option("--tokens", default=_DE.tokens, show_default=True, help="Virtual tokens in the soft prompt.")
@click.option("--dim", default=_DE.dim, show_default=True, help="Dimension of the DE search space z (prompt = P0 + A z).")
@click.option("--bound", default=_DE.bound, show_default=True, help="z lies in [-bound, bound]^dim.")
@click.option("--scale", default=_DE.scale, show_default=True,
              help="Prompt perturbation at |z| = bound, in units of the embedding table's std.")
@click.option("--popsize", default=_DE.popsize, show_default=True, help="DE population size (exactly; not x dim).")
@click.option("--budget", default=_DE.budget, show_default=True,
              help="Candidate evaluations in all (whole generations; the initial population counts). ~1.2 per "
                   "second for SmolLM2 on 2 CPU cores in float32.")
@click.option("--strategy", default=_DE.strategy, show_default=True, type=click.Choice(list(_STRATEGIES)))
@click.option("--mutation", default=",".join(map(str, _DE.mutation)), show_default=True, help="Dithered mutation factor range LO,HI.")
@click.option("--recombination", default=_DE.recombination, show_default=True, help="DE crossover probability.")
@click.option("--seed", default=_DE.seed, show_default=True, help="Seeds A, P0 and DE: same seed, same adapter.")
@click.option("--init", "init", default="persona", show_default=True, type=click.Choice(["persona", "vocab", "text"]),
              help="P0: embeddings of the persona line (DE starts at ICL), of random vocab tokens, or of --init-text.")
@click.option("--init-text", default=None, help="Text whose token embeddings form P0 (with --init text).")
@click.option("--train-presentation", "train_pres", multiple=True, type=PRES_CHOICE,
              help="Presentations the loss is averaged over (repeatable; default: standard).")
@click.option("--heldout-presentation", "heldout_pres", multiple=True, type=PRES_CHOICE,
              help="Presentations scored only at the end (default: the others).")
@click.option("--adapters-dir", default="adapters", show_default=True, envvar="CULIGN_ADAPTERS",
              type=click.Path(file_okay=False, path_type=Path), help="The adapter registry to save into.")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where per-generation checkpoints go (default: ~/.cache/culign/runs).")
@click.option("--resume", is_flag=True, help="Continue the checkpointed run with the same settings (a larger "
              "--budget extends it); the result equals an uninterrupted run with the same seed.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train_cmd(region, target_spec, saudi_variant, name, tokens, dim, bound, scale, popsize, budget, strategy,
              mutation, recombination, seed, init, init_text, train_pres, heldout_pres, adapters_dir,
              checkpoint_dir, resume, model, device, dtype, as_json):
    """Tune a soft prompt with Differential Evolution so the frozen model's VSM 2013 indices match a region.

    Prints naive / persona (ICL) / DE rows, saves the adapter (PEFT prompt-tuning format + culign.json provenance,
    report.json, radar.png) as the next version of REGION in the registry. Ctrl-C stops after saving the best
    prompt found so far; a killed run continues with --resume.
    """
    from .trainer import TrainSettings, train

    target = _target(region, target_spec, saudi_variant, name)
    train_pres = list(train_pres) or ["standard"]
    heldout_pres = list(heldout_pres) or [p for p in PRESENTATIONS if p not in train_pres]
    try:
        settings = TrainSettings(
            de=DEConfig(tokens=tokens, dim=dim, bound=bound, scale=scale, popsize=popsize, budget=budget,
                        strategy=strategy, mutation=_floats(mutation), recombination=recombination, seed=seed,
                        init=init, init_text=init_text),
            train_presentations=train_pres, heldout_presentations=heldout_pres)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    rt = _runtime(model, device, dtype)
    from .registry import Registry, RegistryError

    try:
        outcome = train(rt, target, settings, Registry(adapters_dir), checkpoint_dir=checkpoint_dir, resume=resume,
                        echo=lambda m: click.echo(m, err=True))
    except (ValueError, RegistryError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(outcome.report, indent=2))
    else:
        click.echo(outcome.table)
        click.echo(f"\nsaved {outcome.adapter.ref} -> {outcome.adapter.path}"
                   + (" (interrupted: best prompt so far)" if outcome.report["interrupted"] else ""))


@main.group("adapters")
@click.option("--adapters-dir", default="adapters", show_default=True, envvar="CULIGN_ADAPTERS",
              type=click.Path(file_okay=False, path_type=Path), help="The adapter registry.")
@click.pass_context
def adapters_group(ctx, adapters_dir: Path):
    """List, inspect, verify and remove adapters in the registry (adapters/<REGION>/<version>/)."""
    from .registry import Registry

    ctx.obj = Registry(adapters_dir)


def _ref(ref: str) -> tuple[str, int | None]:
    region, _, v = ref.partition("@")
    if v and not v.isdigit():
        raise click.BadParameter(f"version must be a number: {ref!r}", param_hint="REF")
    return region, int(v) if v else None


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def adapters_list(registry, as_json: bool):
    """Every version in the registry with its loss and base model; unreadable entries are reported, not fatal."""
    infos, warnings = registry.scan()
    if as_json:
        click.echo(json.dumps({"adapters": [i.to_dict() for i in infos], "warnings": warnings}, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    click.echo(f"{'adapter':<12}{'tokens':>7}{'loss':>7}{'held-out':>10}  {'created':<26}base model")
    for i in infos:
        click.echo(f"{i.ref:<12}{i.num_virtual_tokens:>7}{fmt(i.loss):>7}{fmt(i.heldout_loss):>10}  "
                   f"{i.created:<26}{i.base_model}")
    if not infos:
        click.echo(f"(no adapters in {registry.root})")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@adapters_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="The whole provenance (culign.json) as JSON.")
@click.pass_obj
def adapters_show(registry, ref: str, as_json: bool):
    """Provenance and report of REF (REGION or REGION@VERSION; default the latest version)."""
    from .registry import RegistryError

    region, version = _ref(ref)
    try:
        info = registry.resolve(region, version)
        prov = json.loads((info.path / "culign.json").read_text())
    except (RegistryError, ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="REF") from None
    if as_json:
        click.echo(json.dumps(prov, indent=2, sort_keys=True))
        return
    click.echo(f"{info.ref}  {info.path}")
    for key in ("base_model", "base_fingerprint", "created", "culign_version", "seed", "evaluations", "loss",
                "heldout_loss", "naive_loss", "icl_loss", "option_mass", "train_presentations",
                "heldout_presentations", "weights_sha256"):
        if key in prov:
            click.echo(f"  {key:<22}{prov[key]}")
    if "de" in prov:
        click.echo("  de settings           " + ", ".join(f"{k}={v}" for k, v in prov["de"].items()))
    if (info.path / "radar.png").exists():
        click.echo(f"  radar chart           {info.path / 'radar.png'}")


@adapters_group.command("verify")
@click.argument("refs", nargs=-1)
@click.option("--model", default=None, metavar="ID_OR_DIR",
              help="Also check compatibility (hidden size, base fingerprint) with this model (default: only "
                   "integrity; 'embedded' for the embedded SmolLM2).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def adapters_verify(registry, refs, model, as_json):
    """Check integrity (sha256, file shapes) of REFS (default: every adapter). Exit 1 if any fails."""
    kwargs = {}
    if model:
        rt = _runtime(None if model == "embedded" else model, None, None)
        kwargs = {"hidden_size": rt.hidden_size, "base_fingerprint": rt.fingerprint}
    infos, warnings = registry.scan()
    targets = [_ref(r) for r in refs] or [(i.region, i.version) for i in infos]
    results = {}
    for region, version in targets:
        try:
            problems = registry.verify(region, version, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is a verification result here
            problems = [str(e)]
        results[f"{region}@{version}" if version else region] = problems
    if not refs:
        results.update({f"(scan) {w}": [w] for w in warnings})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for ref, problems in results.items():
            click.echo(f"{ref}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    if any(results.values()):
        sys.exit(1)


@adapters_group.command("rm")
@click.argument("ref")
@click.option("--yes", is_flag=True, help="Remove without asking.")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.pass_obj
def adapters_rm(registry, ref: str, yes: bool, dry_run: bool):
    """Remove REF: REGION@VERSION removes one version, REGION removes all of them."""
    from .registry import RegistryError

    region, version = _ref(ref)
    try:
        doomed = [registry.resolve(region, version)] if version else \
            [registry.resolve(region, v) for v in registry.versions(region)]
    except (RegistryError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="REF") from None
    for info in doomed:
        click.echo(f"{'would remove' if dry_run else 'remove'} {info.ref} ({info.path})")
    if dry_run or not doomed:
        return
    if not yes:
        click.confirm(f"remove {len(doomed)} adapter version(s)?", abort=True)
    removed = registry.remove(region, version)
    click.echo(f"removed {', '.join(i.ref for i in removed)}")


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
