"""One training run: baselines (naive, persona), DE over the prompt space, held-out check, report, registry save.

The steps the CLI's `train` runs, kept out of the CLI so that scripts, tests and benchmarks can run them too.
"""
from __future__ import annotations

import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import __version__
from .optimize import DEConfig, PromptSpace, initial_prompt, run_de
from .registry import AdapterInfo, Registry
from .report import Row, format_table, loss_curve_chart, radar_chart
from .runtime import Runtime, cache_root
from .scorer import SurveyScorer
from .survey import DEFAULT_CONSTANT, DIMENSIONS, Survey, persona_line
from .targets import Target


@dataclass
class TrainSettings:
    de: DEConfig = field(default_factory=DEConfig)
    train_presentations: list[str] = field(default_factory=lambda: ["standard"])
    heldout_presentations: list[str] = field(default_factory=lambda: ["reversed", "inline"])
    constant: float = DEFAULT_CONSTANT

    def __post_init__(self):
        overlap = set(self.train_presentations) & set(self.heldout_presentations)
        if overlap:
            raise ValueError(f"presentations both trained on and held out: {', '.join(sorted(overlap))}")
        if not self.train_presentations:
            raise ValueError("at least one training presentation is needed")


@dataclass
class TrainOutcome:
    adapter: AdapterInfo
    report: dict
    table: str
    rows: list[Row]


def _short(indices: dict[str, float]) -> str:
    return " ".join(f"{d}={indices[d]:.0f}" for d in DIMENSIONS)


def train(rt: Runtime, target: Target, settings: TrainSettings, registry: Registry, *,
          checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
          echo: Callable[[str], None] = print) -> TrainOutcome:
    cfg = settings.de
    survey = Survey.load()
    persona = persona_line(target.display_name)
    scorers = {
        (kind, who): SurveyScorer(rt, survey, pres, persona=target.display_name if who == "icl" else None,
                                  constants=settings.constant)
        for kind, pres in (("train", settings.train_presentations), ("heldout", settings.heldout_presentations))
        if pres for who in ("naive", "icl")
    }
    t_start = time.perf_counter()
    echo("scoring baselines (naive, persona) ...")

    def baseline(who: str, prompt=None) -> Row:
        held = scorers.get(("heldout", who))
        return Row(who, scorers[("train", who)].score(prompt)[0], target,
                   heldout=held.score(prompt)[0] if held else None)

    naive, icl = baseline("naive"), baseline("icl")
    echo(f"naive L1 {naive.loss:.1f} ({_short(naive.result.indices)}), option mass {naive.result.option_mass:.2f}; "
         f"persona L1 {icl.loss:.1f}")

    p0 = initial_prompt(rt, cfg, persona)
    space = PromptSpace(p0, cfg, float(rt.embedding_matrix.detach().float().std()))
    run_key = cfg.run_key(rt.fingerprint, json.dumps(target.scores, sort_keys=True), persona,
                          *settings.train_presentations, str(settings.constant), str(rt.dtype))
    ckpt_dir = checkpoint_dir or cache_root() / "runs"
    checkpoint = ckpt_dir / f"{target.key}-{run_key}.json"
    if not resume and checkpoint.exists():
        checkpoint.unlink()  # a fresh run starts fresh; --resume continues it
    bar = tqdm(total=cfg.budget, desc=f"DE {target.key}", unit="eval", disable=not progress, dynamic_ncols=True)

    def on_generation(p):
        bar.set_postfix_str(f"gen {p.generation} best {p.best_loss:.2f} mass {p.best.option_mass:.2f} "
                            f"{_short(p.best.indices)}")

    result = run_de(scorers[("train", "naive")], space, target.scores, cfg, ref_mass=naive.result.option_mass,
                    checkpoint=checkpoint, resume=resume, run_key=run_key, on_generation=on_generation,
                    on_batch=bar.update)
    bar.close()
    held = scorers.get(("heldout", "naive"))
    de = Row("de", result.result, target, heldout=held.score(result.prompt.unsqueeze(0))[0] if held else None)
    rows = [naive, icl, de]
    wall = time.perf_counter() - t_start
    report = {
        "target": target.to_dict(), "model": rt.name, "dtype": str(rt.dtype).replace("torch.", ""),
        "device": str(rt.device), "train_presentations": settings.train_presentations,
        "heldout_presentations": settings.heldout_presentations, "persona": persona, "constant": settings.constant,
        "rows": {r.label: r.to_dict() for r in rows},
        "loss": de.loss, "heldout_loss": de.heldout_loss, "naive_loss": naive.loss, "icl_loss": icl.loss,
        "objective": result.loss, "option_mass": de.result.option_mass,
        "improvement_vs_naive": 1 - de.loss / naive.loss if naive.loss else None,
        "evaluations": result.nfev, "generations": result.generations, "history": result.history,
        "de_wall_time_s": result.elapsed_s, "wall_time_s": wall, "interrupted": result.interrupted,
        "resumed_from_generation": result.resumed_from, "de": cfg.to_dict(), "seed": cfg.seed,
        "index_range_seen": result.seen_range,
    }
    table = format_table(target, rows, result.seen_range)
    radar, curve = io.BytesIO(), io.BytesIO()
    radar_chart(target, rows, radar)
    loss_curve_chart(result.history, {"naive": naive.loss, "persona (ICL)": icl.loss},
                     f"DE on {target.name} ({rt.name}, seed {cfg.seed})", curve)
    provenance = {
        **{k: report[k] for k in ("loss", "heldout_loss", "naive_loss", "icl_loss", "option_mass", "evaluations",
                                  "seed", "de", "train_presentations", "heldout_presentations", "persona",
                                  "constant", "interrupted")},
        "region": target.key, "target": target.to_dict(), "hidden_size": rt.hidden_size,
        "runtime_dtype": report["dtype"], "report": report, "init_text": cfg.init_text or persona,
        "num_layers": getattr(rt.model.config, "num_hidden_layers", None),
        "num_attention_heads": getattr(rt.model.config, "num_attention_heads", None),
        "environment": {"culign": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(rt.device)},
    }
    info = registry.save(target.key, result.prompt, base_model=rt.name, base_fingerprint=rt.fingerprint,
                         provenance=provenance,
                         files={"report.json": json.dumps(report, indent=2, sort_keys=True).encode(),
                                "radar.png": radar.getvalue(), "loss.png": curve.getvalue()})
    if not result.interrupted:
        checkpoint.unlink(missing_ok=True)  # the adapter now holds the result; keep checkpoints only of cut runs
    return TrainOutcome(info, report, table, rows)
