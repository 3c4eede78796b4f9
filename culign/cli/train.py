"""`culign train`: one region, or many at once on Ray (--regions)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..model.precision import PRECISIONS
from ..optimize import STRATEGIES as _STRATEGIES, Optimizer, SearchConfig
from ..targets import TABLE, Target, UnknownRegionError, resolve
from .common import (Refused, StoreLocation, fanout_options, load_runtime, load_survey, make_split, model_options,
                     open_store, parse_target, readout_option, registry_dir, registry_option, split_args,
                     split_options, target_options, validity_text)

_CFG = SearchConfig()  # the train command's defaults are SearchConfig's, stated once

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


@click.command("train")
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
@click.option("--force-invalid", is_flag=True, help="Train although the read-out follows position in the validity "
              "check (a pipeline check, not an alignment): the adapter is marked so in its provenance, `adapters "
              "list`, the report and /v1/models. Without it such a read-out stops the run with exit 2.")
@click.option("--order-balanced/--no-order-balanced", default=None, help="Train on every presentation in both "
              "scale orders (the order:desc held-out family then goes; wordings and templates stay held out). "
              "Default: where the read-out follows meaning and the split is the default one.")
@click.option("--search-precision", type=click.Choice(["auto", *PRECISIONS]), default=None,
              help="What the search scores candidates in: auto (default; env CULIGN_SEARCH_PRECISION) takes the "
                   "fastest precision that ranks 64 random candidates as float32 does (Spearman >= 0.95, measured on "
                   "this CPU, cached), else fp32. Baselines, the final scores and the report are float32 always. A "
                   "named precision that fails that check is refused (exit 1) unless --force-search-precision.")
@click.option("--force-search-precision", is_flag=True,
              help="Use the --search-precision named although it fails the fidelity check (recorded in provenance).")
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
              dtype, as_json, search_precision, force_search_precision):
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
    without --readout; from the cache when there). Training uses the read-out that passes, else one that follows
    meaning but shows no cultural signal (with a warning: only the post-training verdict can call the result an
    alignment); where that read-out follows meaning (order slope >= 0.5) and the split is the default one, it
    trains on both scale orders (held-out families stay disjoint; --order-balanced / --no-order-balanced decide it
    yourself). When every read-out follows position, the run stops with the numbers and exit 2, unless
    --force-invalid. After training, every adapter gets a verdict (docs/method.md, "The post-training verdict"):
    aligned on held-out presentations, gain not shown, follows position, or not judged.

    With --regions, every region is trained as its own Ray task (the same training, one region per task, on a
    local Ray started on demand or the cluster at --ray-address): one live line per region, then a table.
    With --regions the check runs once, here, before the regions fan out (the model is loaded here for it).
    """
    from .. import api
    from ..registry import RegistryError
    from ..model import ModelLoadError
    from ..validity import InvalidModelError

    if regions is not None and (region or target_spec):
        raise click.UsageError("give --regions, or one --region / --target, not both")
    targets = _regions(regions, saudi_variant) if regions is not None else None
    target = None if targets else parse_target(region, target_spec, saudi_variant, name)
    load_survey(wording_files)
    try:
        search = SearchConfig(optimizer=optimizer, tokens=tokens, dim=dim, bound=bound, scale=scale,
                              popsize=popsize, budget=budget, subset=subset, rotate_every=rotate_every, robust=robust,
                              strategy=strategy, max_seconds=None if max_minutes is None else 60.0 * max_minutes,
                              mutation=_floats(mutation), recombination=recombination, sigma=sigma, elites=elites,
                              seed=seed, init=init, init_text=init_text)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if readout is not None or train:  # a bad split fails before anything loads
        make_split(train, heldout, validation, no_validation, readout=readout, wording_files=wording_files)
    if targets:
        from ..fanout import FanoutError, check_address

        try:
            check_address(ray_address)  # before the model and the validity check, like the store below
        except FanoutError as e:
            raise click.BadParameter(str(e), param_hint="--ray-address") from None
    root = registry_dir(adapters_dir)
    registry = open_store(root, check=True)  # before the model: a bad store costs nothing
    common = dict(readout=readout, force_invalid=force_invalid, order_balanced=order_balanced, search=search,
                  resume=resume, progress=progress, echo=lambda m: click.echo(m, err=True),
                  search_precision=search_precision, force_search_precision=force_search_precision,
                  **split_args(train, heldout, validation, no_validation, wording_files))
    try:
        if targets:  # the fan-out: every region as its own task, gated once here (the check is per model)
            return _train_many(targets, root, checkpoint_dir, ray_address, cpus_per_region, gpus_per_region, model,
                               device, dtype, as_json, common)
        rt = load_runtime(model, device, dtype)
        outcome = api.train(target, model=rt, registry=registry, checkpoint_dir=checkpoint_dir, **common)
    except InvalidModelError as e:
        raise Refused(f"{e}.\n{validity_text(e.reports)}\nThe model's answers follow the option's position, not its "
                       "meaning, so no prompt's gain on them can carry a culture (docs/method.md: \"Is the model's "
                       "answer valid?\"). To run the pipeline anyway, add --force-invalid: the adapter is then marked "
                       "as trained on an invalid model.") from None
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
    from .. import api
    from ..fanout import FanoutError, LiveLines, results_table

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
