"""How far can a soft prompt move each index on this model? DE pushed toward 0 and toward 100, per dimension.

The quality bar of a region is bounded by this: a target outside the reachable range of an index costs at least
|target - nearest reachable value| / 6 of L1 loss, whatever the budget. Same prompt space, scorer and DE as
`culign train` (float32), with a one-dimension target (`PDI=100` and `PDI=0`, say); the naive model's value is
printed beside the reached range in the same run.

    python bench/reach.py [--dims IDV,LTO] [--budget 320] [--seed 0]     # ~4.5 min per direction on 2 CPU cores
"""
from __future__ import annotations

import argparse
import time

from culign.evaluation import MassGuard, Robust, presentation_scores
from culign.optimize import PromptSpace, RobustObjective, SearchConfig, initial_prompt, run_search
from culign.model import Runtime, cpu_capability
from culign.scorer import SurveyScorer
from culign.survey import DIMENSIONS, Survey, persona_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="IDV", help="comma-separated dimensions (default IDV; 'all' for the six)")
    ap.add_argument("--budget", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dims = list(DIMENSIONS) if args.dims == "all" else [d.strip().upper() for d in args.dims.split(",")]

    rt = Runtime.load(scoring=True)
    survey = Survey.load()
    scorer = SurveyScorer(rt, survey, ["standard"])
    naive_scores = presentation_scores(survey, scorer.answers(None), {"PDI": 0.0})[0]["vsm/chat/asc"]
    guard = MassGuard({"vsm/chat/asc": naive_scores.option_mass})
    cfg = SearchConfig(budget=args.budget, seed=args.seed, init="vocab", subset=0)  # P0 from random vocabulary
    space = PromptSpace(initial_prompt(rt, cfg, persona_line("nowhere")), cfg, float(rt.embedding_matrix.float().std()))
    print(f"{rt.name} ({rt.dtype}) on {cpu_capability()}, DE budget {cfg.budget} per direction, tokens {cfg.tokens}, dim {cfg.dim}, "
          f"scale {cfg.scale}, seed {cfg.seed}")
    print(f"{'index':<7}{'naive':>7}{'DE toward 0':>13}{'DE toward 100':>15}{'reached span':>14}{'time':>8}")
    for dim in dims:
        t0 = time.perf_counter()
        ends = []
        for goal in (0.0, 100.0):
            objective = RobustObjective(scorer, space, {dim: goal}, ["vsm/chat/asc"], Robust(), guard)
            z = run_search(objective, cfg).z
            ends.append(objective.scores(z[None], ["vsm/chat/asc"])[0]["vsm/chat/asc"].indices[dim])
        low, high = ends
        print(f"{dim:<7}{naive_scores.indices[dim]:>7.1f}{low:>13.1f}{high:>15.1f}{high - low:>14.1f}"
              f"{time.perf_counter() - t0:>7.0f}s", flush=True)


if __name__ == "__main__":
    main()
