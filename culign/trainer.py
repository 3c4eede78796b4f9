"""One training run: baselines (naive, persona), the search, the result re-scored alone on every presentation of
the split, the report, the registry save.

The steps the CLI's `train` runs, kept out of the CLI so that scripts, tests and benchmarks can run them too.
Every number the report prints comes from :mod:`culign.evaluation` scoring the saved prompt alone, exactly as
`culign eval` scores it, so the two agree.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .defaults import cache_root
from .evaluation import Comparison, Evaluation, Evaluator, MassGuard, Respondent, Robust
from .fidelity import Choice, choose
from .model.hardware import cpu_capability
from .model.precision import search_runtime
from .model.runtime import Runtime
from .optimize import PromptSpace, RobustObjective, SearchConfig, SearchResult, initial_prompt, run_search
from .progress import bar as progress_bar
from .registry import AdapterInfo, Registry
from .report import format_table, format_validity, report_files, row_summary
from .scorer import SurveyScorer
from .survey import DEFAULT_CONSTANT, DEFAULT_SPLIT, DIMENSIONS, Split, Survey, persona_line
from .targets import Target
from .verdict import Verdict, judge


@dataclass
class TrainSettings:
    search: SearchConfig = field(default_factory=SearchConfig)
    split: Split = DEFAULT_SPLIT
    constant: float = DEFAULT_CONSTANT
    # what the search scores candidates in (culign.fidelity): fp32 (the reference), bf16, int8, auto, or a Choice made
    # already (the fan-out decides once for all regions). Baselines and every number reported stay float32.
    search_precision: str | Choice = "fp32"
    force_search_precision: bool = False  # a named precision although it fails the fidelity check

    def __post_init__(self):
        if not self.split.train:
            raise ValueError("at least one training presentation is needed")


@dataclass
class TrainOutcome:
    adapter: AdapterInfo
    report: dict
    table: str
    comparison: Comparison
    search: SearchResult
    verdict: Verdict | None = None  # the post-training verdict (culign.verdict), also in report and provenance


def _short(indices: dict[str, float]) -> str:
    return " ".join(f"{d}={indices[d]:.0f}" for d in DIMENSIONS)


def _ticker(bar, stage: str, total: int, on_stage: Callable[[str, int, int], None] | None):
    """One presentation done: the progress bar moves, and ``on_stage`` hears how far the stage is."""
    done = 0

    def tick(_name=None):
        nonlocal done
        done += 1
        bar.update()
        if on_stage is not None:
            on_stage(stage, done, total)
    return tick


def train(rt: Runtime, survey: Survey, target: Target, settings: TrainSettings, registry: Registry, *,
          checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
          echo: Callable[[str], None] = print, on_generation: Callable | None = None,
          on_stage: Callable[[str, int, int], None] | None = None, readout: str | None = None,
          validity: dict | None = None, forced_invalid: bool = False, order_balanced: bool = False) -> TrainOutcome:
    """``on_generation(progress, checkpoint_path)`` is called after each generation's checkpoint is written (the
    fan-out's live lines and its checkpoint upload); ``on_stage(stage, done, total)`` after each presentation the
    baselines and the result's scoring finish, and each elite the pick on validation scores (on a 1.5B model the
    baselines take half an hour before the first generation, the pick ten minutes after the last).

    ``readout``, ``validity`` (read-out -> ValidityReport.summary()), ``forced_invalid`` and ``order_balanced``
    say how the run was gated (culign.validity; the CLI runs the check): they go into the report and provenance.
    The read-out itself is each presentation's template's; ``readout`` defaults to that of the training split."""
    cfg, split = settings.search, settings.split
    readouts = {survey.readout_of(n) for n in split.train}
    if readout is None:
        readout = sorted(readouts)[0]
    if readouts != {readout}:
        raise ValueError(f"the training presentations are written for the {', '.join(sorted(readouts))} read-out, "
                         f"not {readout}")
    t_start = time.perf_counter()
    persona = persona_line(target.display_name)
    evaluator = Evaluator(rt, survey, target, split, settings.constant)
    names = split.all_names
    choice = settings.search_precision  # decided first: a refused precision costs no baselines
    if not isinstance(choice, Choice):
        choice = choose(rt, survey, choice, split.train, cfg, force=settings.force_search_precision,
                        progress=progress, echo=echo)

    # 1. baselines on every presentation of the split (train, validation, held-out)
    bar = progress_bar(2 * len(names), "baselines (naive, persona)", "presentation", progress)
    tick = _ticker(bar, "baselines", 2 * len(names), on_stage)
    naive = evaluator.evaluate(Respondent.naive(), on_presentation=tick)
    icl = evaluator.evaluate(Respondent.with_persona(target.display_name), on_presentation=tick)
    bar.close()
    echo(f"naive: train L1 {naive.train_loss:.2f}, held-out {naive.heldout_loss or float('nan'):.2f} "
         f"({_short(naive.train_indices)}); persona: train {icl.train_loss:.2f}, "
         f"held-out {icl.heldout_loss or float('nan'):.2f}")

    # 2. the search, on the training presentations (validation only picks among its elites at the end)
    guard = MassGuard({n: s.option_mass for n, s in naive.scores.items()}, cfg.mass_floor, cfg.mass_weight)
    p0 = initial_prompt(rt, cfg, persona)
    space = PromptSpace(p0, cfg, float(rt.embedding_matrix.detach().float().std()))
    search_rt = search_runtime(rt, choice.name)  # rt itself for fp32; else a copy sharing rt's float32 tensors
    scorer = evaluator.scorer(None) if search_rt is rt else SurveyScorer(search_rt, survey, names)
    objective = RobustObjective(scorer, space, target.scores, split.train, Robust.parse(cfg.robust), guard,
                                settings.constant)
    run_key = cfg.run_key(rt.fingerprint, json.dumps(target.scores, sort_keys=True), persona,
                          json.dumps(split.to_dict(), sort_keys=True), str(settings.constant), str(rt.dtype),
                          str(rt.fp32_answer), *([] if search_rt is rt else [search_rt.fingerprint]))
    checkpoint = (checkpoint_dir or cache_root() / "runs") / f"{target.key}-{run_key}.json"
    if not resume and checkpoint.exists():
        checkpoint.unlink()  # a fresh run starts fresh; --resume continues it
    # with --max-minutes the budget's ETA may never be reached: the bar says when the search will stop instead
    limit = f" (stops by {cfg.max_seconds / 60:g} min)" if cfg.max_seconds else ""
    bar = progress_bar(cfg.budget, f"{cfg.optimizer.value} {target.key}{limit}", "cand", progress)

    def generation_done(p):
        bar.set_postfix_str(f"gen {p.generation} best {p.best_loss:.2f} mass {p.best_mass:.2f} "
                            f"{_short(p.best_indices)}")
        if on_generation is not None:
            on_generation(p, checkpoint)

    picking = None

    def pick_progress(done: int, total: int):  # the pick among the elites, on the validation presentations
        nonlocal picking
        if picking is None:
            bar.close()
            picking = progress_bar(total, "picking among the elites on validation", "elite", progress)
        else:
            picking.update()
        if on_stage is not None:
            on_stage("picking on validation", done, total)

    result = run_search(objective, cfg, validation=split.validation_names, checkpoint=checkpoint, resume=resume,
                        run_key=run_key, on_generation=generation_done, on_batch=bar.update, on_pick=pick_progress)
    (picking or bar).close()

    # 3. the result, alone, on every presentation: the numbers the report and `culign eval` print. After Ctrl-C the
    # user wants out: the result is saved at once with the training scores the search has (held-out not scored).
    if result.interrupted:
        echo("interrupted: saving the best prompt so far with its training scores (held-out not scored)")
        # (a faster search precision's scores are not reported: then the training presentations again, in float32)
        adapter = Evaluation("adapter", target, split, objective.scores(result.z[None], split.train)[0]) \
            if search_rt is rt else evaluator.evaluate(Respondent("adapter", result.prompt), names=split.train)
    else:
        bar = progress_bar(len(names), "scoring the result", "presentation", progress)
        adapter = evaluator.evaluate(Respondent("adapter", result.prompt),
                                     on_presentation=_ticker(bar, "scoring the result", len(names), on_stage))
        bar.close()
    comparison = Comparison(target, split, [naive, icl, adapter])
    verdict = judge(comparison, adapter)
    wall = time.perf_counter() - t_start
    report = {
        **comparison.to_dict(), "model": rt.name, "dtype": str(rt.dtype).replace("torch.", ""),
        # the search's precision: "objective", "history" and "elites" are in it; every other number is float32
        "search_precision": choice.name, "search_precision_choice": choice.to_dict(),
        "device": str(rt.device), "cpu": cpu_capability() if rt.device.type == "cpu" else None,
        "persona": persona, "constant": settings.constant, "optimizer": cfg.optimizer.value,
        "robust": cfg.robust, **row_summary(adapter, comparison),
        "loss": adapter.train_loss, "naive_loss": naive.train_loss, "icl_loss": icl.train_loss,
        "naive_heldout_loss": naive.heldout_loss, "icl_heldout_loss": icl.heldout_loss,
        "objective": result.objective, "selected_by": result.selected_by, "elites": result.elites,
        "evaluations": result.nfev, "presentation_evaluations": result.presentation_evals,
        "generations": result.generations, "history": result.history, "search_wall_time_s": result.elapsed_s,
        "wall_time_s": wall, "interrupted": result.interrupted, "stopped_by": result.stopped_by,
        "resumed_from_generation": result.resumed_from,
        "search": cfg.to_dict(), "seed": cfg.seed, "index_range_seen": result.seen_range,
        "readout": readout, "validity": validity or {}, "forced_invalid": bool(forced_invalid),
        "order_balanced": bool(order_balanced), "verdict": verdict.to_dict(),
    }
    provenance = {
        **{k: report[k] for k in ("loss", "train_loss", "validation_loss", "heldout_loss", "heldout_by_family",
                                  "gain_kept", "naive_loss", "icl_loss", "naive_heldout_loss", "icl_heldout_loss",
                                  "option_mass", "evaluations", "presentation_evaluations", "seed", "search",
                                  "optimizer", "robust", "split", "persona", "constant", "interrupted", "readout",
                                  "validity", "forced_invalid", "order_balanced", "verdict")},
        "train_presentations": list(split.train), "heldout_presentations": split.heldout_names,
        "region": target.key, "target": target.to_dict(), "hidden_size": rt.hidden_size,
        "runtime_dtype": report["dtype"], "report": report, "init_text": cfg.init_text or persona,
        "num_layers": getattr(rt.model.config, "num_hidden_layers", None),
        "search_precision": choice.name, "search_precision_choice": choice.to_dict(),
        "num_attention_heads": getattr(rt.model.config, "num_attention_heads", None),
        "environment": {"culign": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(rt.device), "cpu": report["cpu"]},
    }
    info = registry.save(target.key, result.prompt, base_model=rt.name, base_fingerprint=rt.fingerprint,
                         provenance=provenance, files=report_files(report, comparison, result.history))
    if result.stopped_by == "budget":
        checkpoint.unlink(missing_ok=True)  # the adapter now holds the result; keep checkpoints only of cut runs
        # (Ctrl-C, or --max-minutes: either can go on with --resume)
    adapter.label = info.ref
    table = format_table(comparison, result.seen_range)
    if validity:
        table += f"\n\nread-out: {readout}" + (" (trained on both scale orders)" if order_balanced else "") \
                 + "\n" + format_validity(validity)
    if forced_invalid:
        table += ("\nTRAINED WITH --force-invalid: the read-out used follows position (validity check); these numbers "
                  "check the pipeline, they are not an alignment.")
    return TrainOutcome(info, report, table, comparison, result, verdict)
