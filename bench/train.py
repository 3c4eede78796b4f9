"""Optimisers and the cost of robustness, at equal budget and seed, in one run.

  today      DE on the one presentation the committed adapters were trained on (vsm/chat/asc), every candidate
             scored on it: what a one-presentation run costs
  DE         the robust objective (9 training presentations, a subset of 1 kept for 4 generations, paired
             re-scoring, elites on all 9, the result picked on the validation families): `culign train`'s default
  DE rot. 1  the same with a new subset every generation (--rotate-every 1, the default before): parents are
             re-scored on nearly every generation's subset
  CMA-ES     the same objective, CMA-ES (the `cma` package) ranking each generation on its subset
  random     the same objective, random search (popsize uniform samples per generation)

For each: wall time, presentation evaluations, the training loss (mean over the 9) and the held-out loss (mean over
the held-out families) of its result, scored alone. Held-out losses are printed to be read, never to choose
settings by. The goal: the robust DE run costs at most 2x today's one-presentation run.

    python bench/train.py [--region US] [--budget 160] [--popsize 16] [--seed 0] [--optimizers de,cma,random] [--no-rotation]
"""
from __future__ import annotations

import argparse
import time

from culign.evaluation import Evaluator, MassGuard, Respondent, Robust
from culign.optimize import PromptSpace, RobustObjective, SearchConfig, initial_prompt, run_search
from culign.model import Runtime, cpu_capability
from culign.survey import DEFAULT_SPLIT, Split, Survey, persona_line
from culign.targets import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--region", default="US")
    ap.add_argument("--budget", type=int, default=160)
    ap.add_argument("--popsize", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizers", default="de,cma,random")
    ap.add_argument("--rotation", action=argparse.BooleanOptionalAction, default=True,
                    help="also run robust DE with a new subset every generation (--rotate-every 1)")
    args = ap.parse_args()

    rt = Runtime.load(scoring=True)  # float32, as `culign train` scores
    survey, target, split = Survey.load(), resolve(args.region), DEFAULT_SPLIT
    evaluator = Evaluator(rt, survey, target, split)
    naive = evaluator.evaluate(Respondent.naive())
    persona = evaluator.evaluate(Respondent.with_persona(target.display_name))
    guard = MassGuard({n: s.option_mass for n, s in naive.scores.items()})
    print(f"CPU: {cpu_capability()}; {target.name}, budget {args.budget}, popsize {args.popsize}, seed {args.seed}")
    print(f"naive: train {naive.train_loss:.2f}, held-out {naive.heldout_loss:.2f}; persona: train "
          f"{persona.train_loss:.2f}, held-out {persona.heldout_loss:.2f}\n")

    def run(optimizer: str, train: list[str], subset: int, validation: list[str], rotate_every: int = 1):
        cfg = SearchConfig(optimizer=optimizer, budget=args.budget, popsize=args.popsize, seed=args.seed,
                           subset=subset, rotate_every=rotate_every)
        space = PromptSpace(initial_prompt(rt, cfg, persona_line(target.display_name)), cfg,
                            float(rt.embedding_matrix.float().std()))
        objective = RobustObjective(evaluator.scorer(None), space, target.scores, train, Robust.parse(cfg.robust),
                                    guard)
        t0 = time.perf_counter()
        result = run_search(objective, cfg, validation=validation)
        wall = time.perf_counter() - t0
        scored = evaluator.evaluate(Respondent(optimizer, result.prompt))
        return wall, result, scored

    rows = []
    wall, res, ev = run("de", ["vsm/chat/asc"], 0, [])
    rows.append(("today (1 presentation)", wall, res, ev))
    if args.rotation:  # the previous default: a new subset every generation, so DE re-scores parents every time
        wall, res, ev = run("de", list(split.train), SearchConfig.subset, split.validation_names, 1)
        rows.append(("de (robust, rotate 1)", wall, res, ev))
    for opt in args.optimizers.split(","):
        wall, res, ev = run(opt, list(split.train), SearchConfig.subset, split.validation_names,
                            SearchConfig.rotate_every)
        rows.append((f"{opt} (robust)", wall, res, ev))
    print(f"{'run':<24}{'wall s':>8}{'vs today':>10}{'pres-evals':>12}{'per cand':>10}{'train':>8}{'held-out':>10}"
          f"{'picked by':>12}")
    t_today = rows[0][1]
    for name, wall, res, ev in rows:
        print(f"{name:<24}{wall:>8.0f}{wall / t_today:>9.2f}x{res.presentation_evals:>12}"
              f"{res.presentation_evals / res.nfev:>10.2f}{ev.train_loss:>8.2f}{ev.heldout_loss:>10.2f}"
              f"{res.selected_by:>12}")
    de = next((r for r in rows[1:] if r[0] == "de (robust)"), None)
    if de:
        print(f"\nrobust DE costs {de[1] / t_today:.2f}x today's one-presentation run at equal budget (goal <= 2x)")


if __name__ == "__main__":
    main()
