"""The `culign` command line: regions, presentations, eval, train, adapters. Friendly errors live here and only here."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .optimize import STRATEGIES as _STRATEGIES, Optimizer, SearchConfig
from .survey import DIMENSIONS, ORDERS, READOUTS, Split, SurveyDataError, persona_line
from .targets import SAUDI_VARIANTS, DEFAULT_SAUDI_VARIANT, Target, UnknownRegionError, parse_custom, resolve, TABLE

_CFG = SearchConfig()  # the train command's defaults are SearchConfig's, stated once
DEFAULT_REGISTRY = Path("runs") / "adapters"  # the user's registry; the committed examples live in ./adapters


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


def _survey(wording_files):
    from .survey import Survey

    try:
        return Survey.load(wording_files=wording_files)
    except SurveyDataError as e:
        raise click.BadParameter(str(e), param_hint="--wording-file") from None


def _split(train, heldout, validation, no_validation: bool, presentations=(), readout: str | None = None,
           wording_files=()) -> Split:
    """The split a command runs on (culign.api.make_split): --presentation alone (no held-out), or the read-out's
    default split with overrides."""
    from . import api

    try:
        return api.make_split(readout, presentations=presentations, **_split_args(train, heldout, validation,
                                                                                  no_validation, wording_files))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=_SPLIT_HINT if not presentations else "--presentation") \
            from None


_SPLIT_HINT = "--train-presentation/--heldout/--validation/--readout"


def _split_args(train, heldout, validation, no_validation: bool, wording_files=()) -> dict:
    """The split options as culign.api's keywords."""
    return dict(train=train, heldout=heldout, validation=[] if no_validation else (list(validation) or None),
                wording_files=wording_files)


class _Refused(click.ClickException):
    """The model failed the validity check and training was not forced: exit 2, like any usage error."""
    exit_code = 2


def _checks(rt, readouts, use_cache: bool = True, progress: bool = True) -> dict:
    """The validity check of each read-out (culign.api.check_validity): from the cache when there, else measured
    with a progress bar on stderr."""
    from . import api

    return api.check_validity(rt, readouts=readouts, use_cache=use_cache, progress=progress)


def _validity_text(checks: dict) -> str:
    from .report import format_validity

    return format_validity({r: v.summary() for r, v in checks.items()})


def readout_option(help_text: str):
    return click.option("--readout", type=click.Choice(list(READOUTS)), default=None, help=help_text)


class _status:
    """A one-line 'doing X ... done (1.2 s)' on stderr: long steps show they are alive."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t0 = time.perf_counter()
        click.echo(f"{self.what} ...", err=True, nl=False)

    def __exit__(self, exc_type, *_):
        click.echo(f" {'done' if exc_type is None else 'failed'} ({time.perf_counter() - self.t0:.1f} s)", err=True)


# ---------------------------------------------------------------------------------------------------- options
def model_options(f):
    f = click.option("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: float32. bf16 is "
                     "faster where the CPU has it natively, but its rounding moves the indices by 1-3 points, as much "
                     "as a soft prompt's effect, and the search then tunes to the noise). Env CULIGN_DTYPE.")(f)
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
    f = click.option("--target", "target_spec", default=None, metavar="DIM=N,...|@FILE",
                     help="Custom target instead of a region, e.g. PDI=80,IDV=20,MAS=66 (partial targets score "
                          "only the dimensions given), or @FILE: a JSON object or DIM=N lines (# comments).")(f)
    f = click.option("--region", default=None, help="Hofstede code (USA), ISO-2 alias (US) or country name, "
                     "case-insensitive. `culign regions` lists them.")(f)
    return f


def split_options(f):
    f = click.option("--wording-file", "wording_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
                     help="Add a wording of your own (JSON, the shape of culign/data/wordings/*.json; validated, "
                          "errors name the item and line). Repeatable.")(f)
    f = click.option("--no-validation", is_flag=True, help="No validation family: the result is the best on the "
                     "training presentations.")(f)
    f = click.option("--validation", "validation", multiple=True, metavar="PRESENTATION",
                     help="Validation presentations (names or patterns; one family each) instead of the default "
                          "families wording:casual and template:quiz.")(f)
    f = click.option("--heldout", "--heldout-presentation", "heldout", multiple=True, metavar="PRESENTATION",
                     help="Held-out presentations (names or patterns, e.g. 'formal/*/asc'; one family each) instead of "
                          "the default families.")(f)
    f = click.option("--train-presentation", "train", multiple=True, metavar="PRESENTATION",
                     help="Training presentations: names (vsm/chat/asc, or the old standard, reversed, inline) or "
                          "patterns (vsm/*/asc). Default: 3 wordings x 3 templates, ascending "
                          "(`culign presentations` shows the split).")(f)
    return f


class StoreLocation(click.ParamType):
    """A local folder, or an object-store URL (s3://BUCKET/PREFIX) checked for shape here; reachability and
    credentials are checked by the command before it writes anything."""

    name = "DIR|s3://BUCKET/PREFIX"

    def convert(self, value, param, ctx):
        from .object_registry import ObjectRegistry, is_url

        if isinstance(value, Path) or not is_url(str(value)):
            path = Path(str(value).removeprefix("file://"))
            if path.exists() and not path.is_dir():
                self.fail(f"{str(path)!r} is a file, not a folder", param, ctx)
            return path
        try:
            ObjectRegistry(str(value), cache_dir="/nonexistent")  # the URL's shape only; nothing is contacted
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return str(value)


def registry_option(f):
    """--adapters-dir, accepted on the group and on every subcommand (after the subcommand wins)."""
    return click.option("--adapters-dir", default=None, type=StoreLocation(),
                        help=f"The adapter registry: a folder or s3://BUCKET/PREFIX (credentials and endpoint from "
                             f"the usual AWS environment). Default: $CULIGN_ADAPTERS, else ./{DEFAULT_REGISTRY} (the "
                             "committed examples are in ./adapters).")(f)


def fanout_options(f):
    f = click.option("--ray-address", default=None, metavar="HOST:PORT",
                     help="Join this Ray cluster (default: $RAY_ADDRESS, else a local Ray started for the run).")(f)
    f = click.option("--gpus-per-region", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="GPUs each region's task reserves (--regions).")(f)
    f = click.option("--cpus-per-region", default=1.0, show_default=True, type=click.FloatRange(min=0.5),
                     help="CPUs each region's task reserves; torch uses as many threads (--regions).")(f)
    f = click.option("--regions", default=None, metavar="R1,R2,...|all|@FILE",
                     help="Train many regions at once, one Ray task each: a comma list, 'all' (every region of the "
                          "Hofstede table) or @FILE (one region a line, # comments).")(f)
    return f


def _registry_dir(given: "Path | str | None", ctx: click.Context | None = None) -> "Path | str":
    if given is not None:
        return given
    if ctx is not None and ctx.obj and ctx.obj.get("adapters_dir") is not None:
        return ctx.obj["adapters_dir"]
    return StoreLocation().convert(os.environ.get("CULIGN_ADAPTERS") or DEFAULT_REGISTRY, None, None)


def _open_registry(root: "Path | str", param_hint: str = "--adapters-dir", check: bool = False):
    """The registry at root; with ``check``, an object store is listed once first, so an unreachable store or
    wrong credentials are a usage error before any work (and any write)."""
    from .object_registry import ObjectRegistry, RegistryUnavailable
    from .registry import open_registry

    registry = open_registry(root)
    if check and isinstance(registry, ObjectRegistry):
        try:
            registry.scan()
        except RegistryUnavailable as e:
            raise click.BadParameter(str(e), param_hint=param_hint) from None
    return registry


# ---------------------------------------------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="culign")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (loading, rescans, ...).")
def main(verbose: bool):
    """Cultural alignment of a frozen LLM with soft prompts (Masoud et al., 2025).

    The frozen model answers Hofstede's VSM 2013 survey; its answers give six indices (PDI, IDV, MAS, UAI,
    LTO, IVR) compared with a region's published scores by L1 loss. `train` tunes a soft prompt black-box (DE,
    CMA-ES) on many wordings and templates of the survey and checks it on ones it never saw; `eval` measures a
    model, a persona prompt or an adapter the same way.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command("regions")
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


@main.command("presentations")
@split_options
@readout_option("Show the default split of this read-out (default: digit).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def presentations_cmd(train, heldout, validation, no_validation, wording_files, readout, as_json):
    """List the wordings, templates and orders, and the split: which presentations train, which validate and
    which are held out, family by family.

    A presentation is WORDING/TEMPLATE/ORDER, e.g. vsm/chat/asc. Outputs: a listing (or JSON) on stdout.
    """
    survey = _survey(wording_files)
    split = _split(train, heldout, validation, no_validation, readout=readout or "digit", wording_files=wording_files)
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


@main.command("validity")
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
    trains only on a read-out that passes. Outputs: the numbers and verdicts (or JSON) on stdout.
    """
    from . import validity

    rt = _runtime(model, device, dtype)
    readouts = list(READOUTS) if readout == "all" else [readout]
    checks = _checks(rt, readouts, use_cache=not no_cache, progress=progress)
    if as_json:
        click.echo(json.dumps({r: {**v.to_dict(), "from_cache": v.from_cache} for r, v in checks.items()}, indent=2))
        return
    first = next(iter(checks.values()))
    click.echo(f"{rt.name}: {len(first.panel)} persona countries ({', '.join(first.panel)}) and the bare model")
    for r, v in checks.items():
        click.echo(f"  {r}: {', '.join(v.presentations)} ({validity.steps(r)} presentation-evaluations, "
                   f"{v.wall_time_s:.0f} s{', from the cache' if v.from_cache else ''}"
                   f"{'; ' + v.environment['cpu'] if v.environment.get('cpu') else ''})")
    click.echo(_validity_text(checks))
    if not any(v.passes for v in checks.values()):
        click.echo("\nno read-out passes: this model's answers are not known to carry a culture, and `culign train` "
                   "refuses to train on it (exit 2) unless given --force-invalid.")


@main.command("eval")
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
    from . import api
    from .report import format_table

    target = _target(region, target_spec, saudi_variant)
    _survey(wording_files)  # a bad wording file is named before the model loads
    rt = _runtime(model, device, dtype)
    loaded = [_load_adapter(name, _registry_dir(adapters_dir), rt) for name in adapters]
    try:
        result = api.evaluate(target, model=rt, adapters=loaded, persona=icl, presentations=presentations,
                              readout=readout, validity=validity, progress=not as_json,
                              **_split_args(train, heldout, validation, no_validation, wording_files))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--presentation" if presentations else _SPLIT_HINT) from None
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
            click.echo("\n" + _validity_text(result.validity))


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
@click.option("--optimizer", type=click.Choice([o.value for o in Optimizer]), default=_CFG.optimizer.value,
              show_default=True, help="de (Differential Evolution, the paper's), cma (CMA-ES, Black-Box Tuning's) "
                                      "or random (random search, the floor).")
@click.option("--robust", default=_CFG.robust, show_default=True, metavar="mean|worst|mean+Kstd",
              help="How the per-presentation losses are aggregated into the objective.")
@click.option("--subset", default=_CFG.subset, show_default=True,
              help="Training presentations each generation is scored on (0: all). "
                   "The best candidate of each generation is scored on all of them.")
@click.option("--rotate-every", default=_CFG.rotate_every, show_default=True, metavar="GENERATIONS",
              help="Generations a subset is kept for before the next is drawn: DE pays its parents' scores on a "
                   "subset once per block, not every generation (1: a new subset every generation).")
@click.option("--tokens", default=_CFG.tokens, show_default=True, help="Virtual tokens in the soft prompt.")
@click.option("--dim", default=_CFG.dim, show_default=True, help="Dimension of the search space z (prompt = P0 + A z).")
@click.option("--bound", default=_CFG.bound, show_default=True, help="z lies in [-bound, bound]^dim.")
@click.option("--scale", default=_CFG.scale, show_default=True,
              help="Prompt perturbation at |z| = bound, in units of the embedding table's std.")
@click.option("--popsize", default=_CFG.popsize, show_default=True, help="Candidates per generation.")
@click.option("--budget", default=_CFG.budget, show_default=True,
              help="Candidate evaluations in all (whole generations; the first counts).")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Also stop the search before a generation that would end past this many minutes (the result "
                   "is then the best so far, not interrupted; the report says `stopped_by: time`).")
@click.option("--strategy", default=_CFG.strategy, show_default=True, type=click.Choice(list(_STRATEGIES)),
              help="DE strategy.")
@click.option("--mutation", default=",".join(map(str, _CFG.mutation)), show_default=True,
              help="DE dithered mutation factor range LO,HI.")
@click.option("--recombination", default=_CFG.recombination, show_default=True, help="DE crossover probability.")
@click.option("--sigma", default=_CFG.sigma, show_default=True, help="CMA-ES initial step, as a fraction of bound.")
@click.option("--elites", default=_CFG.elites, show_default=True,
              help="Best candidates scored on the validation presentations to pick the result.")
@click.option("--seed", default=_CFG.seed, show_default=True, help="Seeds A, P0, the subsets and the optimiser: "
              "same seed, same adapter.")
@click.option("--init", "init", default="persona", show_default=True, type=click.Choice(["persona", "vocab", "text"]),
              help="P0: embeddings of the persona line (the search starts at it), random vocab tokens, or --init-text.")
@click.option("--init-text", default=None, help="Text whose token embeddings form P0 (with --init text).")
@readout_option("How answers are read: digit (the option symbol after the prefill) or label (each option's label "
                "scored as the continuation; its own templates). Default: the read-out that passes the model's "
                "validity check (`culign validity`), run first (from the cache when there).")
@click.option("--force-invalid", is_flag=True, help="Train although no read-out passes the validity check (a "
              "pipeline check, not an alignment): the adapter is marked so in its provenance, `adapters list`, "
              "the report and /v1/models. Without it such a model stops the run with exit 2.")
@click.option("--order-balanced/--no-order-balanced", default=None, help="Train on every presentation in both "
              "scale orders (the order:desc held-out family then goes; wordings and templates stay held out). "
              "Default: where the read-out follows meaning and the split is the default one.")
@split_options
@registry_option
@click.option("--checkpoint-dir", default=None, type=StoreLocation(),
              help="Where per-generation checkpoints go (default: ~/.cache/culign/runs). With --regions on several "
                   "machines: a folder every worker sees, or s3://BUCKET/PREFIX.")
@fanout_options
@click.option("--resume", is_flag=True, help="Continue the checkpointed run with the same settings (a larger "
              "--budget extends it); the result equals an uninterrupted run with the same seed.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train_cmd(region, target_spec, saudi_variant, name, optimizer, robust, subset, rotate_every, tokens, dim, bound, scale, popsize,
              budget, max_minutes, strategy, mutation, recombination, sigma, elites, seed, init, init_text, readout,
              force_invalid, order_balanced, train, heldout, validation, no_validation, wording_files, adapters_dir,
              checkpoint_dir, regions, cpus_per_region, gpus_per_region, ray_address, resume, progress, model, device,
              dtype, as_json):
    """Tune a soft prompt black-box so the frozen model's VSM 2013 indices match a region on every wording.

    Scores the naive model and the persona baseline on every presentation of the split, searches on the training
    presentations, re-scores the result alone everywhere and saves it as the next version of REGION.

    \b
    Outputs, in <adapters-dir>/<REGION>/<version>/:
      adapter_model.safetensors, adapter_config.json   the soft prompt (HF PEFT prompt-tuning format)
      culign.json    provenance: base model and fingerprint, target, split, settings, seed, scores, version
      report.json    every row's indices and losses per presentation, gain kept, noise band, search history
      radar.png      target vs naive vs persona vs adapter, training and held-out presentations
      loss.png       the search's best training loss against evaluations, with the baselines
      report.html    all of it on one self-contained page (`culign report` redraws it)
    and the table on stdout. Ctrl-C saves the best prompt so far (marked interrupted) and exits 130; a killed
    run continues with --resume.

    \b
    Before anything is trained, the model's validity check (`culign validity`) runs for the read-out (or for both,
    without --readout; from the cache when there). Training uses the read-out that passes; where that read-out
    follows meaning (order slope >= 0.5) and the split is the default one, it trains on both scale orders
    (held-out families stay disjoint; --order-balanced / --no-order-balanced decide it yourself). When none
    passes, the run stops with the numbers and exit 2, unless --force-invalid.

    With --regions, every region is trained as its own Ray task (the same training, one region per task, on a
    local Ray started on demand or the cluster at --ray-address): one live line per region, then a table.
    With --regions the check runs once, here, before the regions fan out (the model is loaded here for it).
    """
    from . import api
    from .registry import RegistryError
    from .runtime import ModelLoadError
    from .validity import InvalidModelError

    if regions is not None and (region or target_spec):
        raise click.UsageError("give --regions, or one --region / --target, not both")
    targets = _regions(regions, saudi_variant) if regions is not None else None
    target = None if targets else _target(region, target_spec, saudi_variant, name)
    _survey(wording_files)
    try:
        search = SearchConfig(optimizer=optimizer, tokens=tokens, dim=dim, bound=bound, scale=scale,
                              popsize=popsize, budget=budget, subset=subset, rotate_every=rotate_every, robust=robust,
                              strategy=strategy, max_seconds=None if max_minutes is None else 60.0 * max_minutes,
                              mutation=_floats(mutation), recombination=recombination, sigma=sigma, elites=elites,
                              seed=seed, init=init, init_text=init_text)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if readout is not None or train:  # a bad split fails before anything loads
        _split(train, heldout, validation, no_validation, readout=readout, wording_files=wording_files)
    if targets:
        from .fanout import FanoutError, check_address

        try:
            check_address(ray_address)  # before the model and the validity check, like the store below
        except FanoutError as e:
            raise click.BadParameter(str(e), param_hint="--ray-address") from None
    root = _registry_dir(adapters_dir)
    registry = _open_registry(root, check=True)  # before the model: a bad store costs nothing
    common = dict(readout=readout, force_invalid=force_invalid, order_balanced=order_balanced, search=search,
                  resume=resume, progress=progress, echo=lambda m: click.echo(m, err=True),
                  **_split_args(train, heldout, validation, no_validation, wording_files))
    try:
        if targets:  # the fan-out: every region as its own task, gated once here (the check is per model)
            return _train_many(targets, root, checkpoint_dir, ray_address, cpus_per_region, gpus_per_region, model,
                               device, dtype, as_json, common)
        rt = _runtime(model, device, dtype)
        outcome = api.train(target, model=rt, registry=registry, checkpoint_dir=checkpoint_dir, **common)
    except InvalidModelError as e:
        raise _Refused(f"{e}.\n{_validity_text(e.reports)}\nThe model's answers do not follow meaning and culture "
                       "well enough for an alignment to mean anything (docs/method.md: \"Is the model's answer "
                       "valid?\"). To run the pipeline anyway, add --force-invalid: the adapter is then marked as "
                       "trained on an invalid model.") from None
    except (ValueError, RegistryError, ModelLoadError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:  # before the search began (or after it, while saving): nothing half-written is kept
        click.echo("\ninterrupted before a prompt was saved: nothing written (a checkpoint, if the search had "
                   "started, lets --resume continue)", err=True)
        sys.exit(130)
    click.echo(json.dumps(outcome.report, indent=2) if as_json else outcome.table())
    interrupted = outcome.report["interrupted"]
    click.echo(f"\n{'interrupted: best prompt so far ' if interrupted else ''}saved {outcome.adapter.ref} -> "
               f"{outcome.adapter.path}\nreport: {outcome.adapter.path / 'report.html'} (report.json, radar.png, "
               "loss.png beside it)", err=True)
    if interrupted:
        sys.exit(130)


def _regions(spec: str, saudi_variant: str) -> list[Target]:
    """--regions: every name checked before anything starts; unknown ones are named together."""
    if spec.strip().lower() == "all":
        names = [t.key for t in TABLE]
    elif spec.startswith("@"):
        try:
            text = Path(spec[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {spec[1:]!r}: {e}", param_hint="--regions") from None
        names = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    else:
        names = spec.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise click.BadParameter("no region given", param_hint="--regions")
    targets, unknown = [], []
    for n in names:
        try:
            targets.append(resolve(n, saudi_variant=saudi_variant))
        except (UnknownRegionError, ValueError) as e:
            unknown.append(str(e))
    if unknown:
        raise click.BadParameter("; ".join(unknown), param_hint="--regions")
    seen: dict[str, Target] = {}
    for t in targets:
        seen.setdefault(t.key, t)  # "US,USA,united states" is one region
    return list(seen.values())


def _train_many(targets, root, checkpoint_dir, ray_address, cpus_per_region, gpus_per_region, model, device, dtype,
                as_json: bool, common: dict):
    from . import api
    from .fanout import FanoutError, LiveLines, results_table

    try:
        results = api.train_regions(targets, model=model, device=device, dtype=dtype, registry=root,
                                    checkpoint_dir=checkpoint_dir, ray_address=ray_address,
                                    cpus_per_region=cpus_per_region, gpus_per_region=gpus_per_region,
                                    on_update=LiveLines() if common["progress"] else None, **common)
    except FanoutError as e:
        raise click.BadParameter(str(e), param_hint="--ray-address") from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every region's checkpoint is kept; the same command with --resume continues "
                   "them all", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        click.echo(results_table(results))
    failed = [r.region for r in results if not r.ok]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} regions failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@main.command("report")
@click.argument("what", required=False, metavar="[ADAPTER_DIR|REPORT_JSON|REGION[@V]]")
@registry_option
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: report-<REGION>-<version>.html, or registry-report.html, in "
                   "the current folder).")
def report_cmd(what, adapters_dir, out):
    """One self-contained HTML page (inline SVG, no network) for a run or for a whole registry.

    With an adapter folder, a report.json or REGION[@VERSION]: that run's page (radar of target, naive, persona
    and adapter on training and held-out presentations, per-index table, losses with gain kept and the noise
    band, the loss curve, the provenance). Without: one page for every adapter in the registry. `culign train`
    writes the run's page as report.html beside report.json already. Outputs: the HTML file; its path on stdout.
    """
    from .evaluation import Comparison
    from .registry import RegistryError
    from .report import html_report, registry_html

    registry = _open_registry(_registry_dir(adapters_dir), check=True)

    def load(path: Path) -> tuple[dict, Comparison]:
        try:
            report = json.loads(path.read_text())
            return report, Comparison.from_dict(report)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.BadParameter(f"{path}: not a readable culign report ({e})", param_hint="WHAT") from None

    if what is None:
        infos, _ = registry.scan()
        entries = [(i.ref, *load(i.path / "report.json")) for i in infos if (i.path / "report.json").exists()]
        if not entries:
            raise click.BadParameter(f"no adapter with a report.json in {registry.root}", param_hint="--adapters-dir")
        page, default = registry_html(entries, str(registry.root)), Path("registry-report.html")
    else:
        path = Path(what)
        if path.is_dir():
            path = path / "report.json"
        if not path.exists():
            region, version = _ref(what)
            try:
                path = registry.resolve(region, version).path / "report.json"
            except (RegistryError, ValueError) as e:
                raise click.BadParameter(str(e), param_hint="WHAT") from None
        report, comparison = load(path)
        folder = path.parent
        name = f"{folder.parent.name}@{folder.name}" if folder.name.isdigit() else folder.name
        page, default = html_report(report, comparison, title=name), Path(f"report-{name.replace('@', '-')}.html")
    target = out or default
    target.write_text(page, encoding="utf-8")
    click.echo(str(target))


@main.group("adapters")
@registry_option
@click.pass_context
def adapters_group(ctx, adapters_dir: Path | None):
    """List, inspect, verify and remove adapters in the registry (<adapters-dir>/<REGION>/<version>/)."""
    ctx.obj = {"adapters_dir": adapters_dir}


def _registry(ctx: click.Context, adapters_dir: Path | None):
    return _open_registry(_registry_dir(adapters_dir, ctx), check=True)


def _ref(ref: str, param_hint: str = "REF") -> tuple[str, int | None]:
    """REGION or REGION@VERSION, by the one parser the service uses for its header and ``model`` field."""
    from .regions import BadRegionSpec, parse_region

    try:
        spec = parse_region(ref, param_hint)
    except BadRegionSpec as e:
        raise click.BadParameter(str(e), param_hint=param_hint) from None
    return spec.name, spec.version


@adapters_group.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def adapters_list(ctx, adapters_dir, as_json: bool):
    """Every version in the registry with its losses and base model; unreadable entries are reported, not fatal.

    Outputs: a table (or JSON) on stdout, warnings on stderr.
    """
    registry = _registry(ctx, adapters_dir)
    infos, warnings = registry.scan()
    if as_json:
        click.echo(json.dumps({"adapters": [i.to_dict() for i in infos], "warnings": warnings}, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    kept = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    click.echo(f"{'adapter':<12}{'tokens':>7}{'trained on':>11}{'train':>7}{'held-out':>10}{'kept':>6}  "
               f"{'created':<26}base model")
    for i in infos:
        pres = "-" if i.train_presentations is None else f"{i.train_presentations} pres."
        click.echo(f"{i.ref:<12}{i.num_virtual_tokens:>7}{pres:>11}{fmt(i.loss):>7}{fmt(i.heldout_loss):>10}"
                   f"{kept(i.gain_kept):>6}  {i.created:<26}{i.base_model}"
                   + ("  INTERRUPTED (best prompt so far)" if i.interrupted else "")
                   + ("  INVALID MODEL (trained with --force-invalid)" if i.forced_invalid else ""))
    if not infos:
        click.echo(f"(no adapters in {registry.root})")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@adapters_group.command("show")
@click.argument("ref")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="The whole provenance (culign.json) as JSON.")
@click.pass_context
def adapters_show(ctx, ref: str, adapters_dir, as_json: bool):
    """Provenance and report of REF (REGION or REGION@VERSION; default the latest version).

    Outputs: the provenance (or JSON) on stdout.
    """
    from .registry import RegistryError

    registry = _registry(ctx, adapters_dir)
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
    for key in ("base_model", "base_fingerprint", "created", "culign_version", "seed", "optimizer", "robust",
                "evaluations", "presentation_evaluations", "loss", "validation_loss", "heldout_loss", "gain_kept",
                "naive_loss", "icl_loss", "option_mass", "train_presentations", "heldout_presentations",
                "interrupted", "readout", "forced_invalid", "weights_sha256"):
        if key in prov:
            click.echo(f"  {key:<26}{prov[key]}")
    settings = prov.get("search") or prov.get("de")
    if settings:
        click.echo("  settings                  " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for f in ("report.json", "radar.png", "loss.png"):
        if (info.path / f).exists():
            click.echo(f"  {f:<26}{info.path / f}")


@adapters_group.command("verify")
@click.argument("refs", nargs=-1)
@registry_option
@click.option("--model", default=None, metavar="ID_OR_DIR",
              help="Also check compatibility (hidden size, base fingerprint) with this model (default: only "
                   "integrity; 'embedded' for the embedded SmolLM2).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def adapters_verify(ctx, refs, adapters_dir, model, as_json):
    """Check integrity (sha256, file shapes) of REFS (default: every adapter). Exit 1 if any fails.

    Outputs: one line per adapter (or JSON) on stdout.
    """
    registry = _registry(ctx, adapters_dir)
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
    if not refs:  # what the scan refused (and so a server never lists): the same rule, the same reasons
        results.update({getattr(w, "ref", f"(scan) {w}"): [str(w)] for w in warnings})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for ref, problems in results.items():
            click.echo(f"{ref}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    if any(results.values()):
        sys.exit(1)


@adapters_group.command("rm")
@click.argument("ref")
@registry_option
@click.option("--yes", is_flag=True, help="Remove without asking.")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.pass_context
def adapters_rm(ctx, ref: str, adapters_dir, yes: bool, dry_run: bool):
    """Remove REF: REGION@VERSION removes one version, REGION removes all of them.

    Outputs: what was (or would be) removed, on stdout.
    """
    from .registry import RegistryError

    registry = _registry(ctx, adapters_dir)
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


def _load_adapter(name: str, adapters_dir, rt):
    """An adapter folder path, or REGION[@VERSION] in the registry (culign.api.load_adapter), as a usage error when
    it cannot be loaded for this model."""
    from . import api
    from .registry import RegistryError

    try:
        registry = None if Path(name).is_dir() else _open_registry(adapters_dir, check=True)
        return api.load_adapter(name, rt, registry)
    except (RegistryError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--adapter") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
