"""Loss vs candidate evaluations: DE against random search at equal budget, same prompt space, same scorer.

    python bench/train.py [--region US] [--budget 160] [--popsize 16] [--seed 0]

Both start from the same P0 (the persona line's embeddings) and draw z from the same box; random search scores
`popsize` uniform samples per step and keeps the best. Printed as a table of best loss after each step.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from culign.optimize import DEConfig, PromptSpace, initial_prompt, run_de, Objective
from culign.runtime import Runtime
from culign.scorer import SurveyScorer
from culign.survey import Survey, persona_line
from culign.targets import resolve


def random_search(objective: Objective, cfg: DEConfig) -> list[tuple[int, float]]:
    rng = np.random.default_rng(cfg.seed)
    curve, best = [], np.inf
    first = True
    while objective.nfev + cfg.popsize <= cfg.budget:
        z = rng.uniform(-cfg.bound, cfg.bound, size=(cfg.popsize, cfg.dim))
        if first:
            z[0] = 0.0  # the same starting point DE has in its initial population
            first = False
        best = min(best, float(objective(z.T).min()))
        curve.append((objective.nfev, best))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--region", default="US")
    ap.add_argument("--budget", type=int, default=160)
    ap.add_argument("--popsize", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rt = Runtime.load(scoring=True)  # float32, as `culign train` scores
    target = resolve(args.region)
    cfg = DEConfig(budget=args.budget, popsize=args.popsize, seed=args.seed)
    scorer = SurveyScorer(rt, Survey.load(), ["standard"])
    naive = scorer.score(None)[0]
    space = PromptSpace(initial_prompt(rt, cfg, persona_line(target.display_name)), cfg,
                        float(rt.embedding_matrix.float().std()))

    t0 = time.perf_counter()
    de = run_de(scorer, space, target.scores, cfg, ref_mass=naive.option_mass)
    t_de = time.perf_counter() - t0
    de_curve = [(int(n), loss) for n, loss in de.history]

    t0 = time.perf_counter()
    rs_curve = random_search(Objective(scorer, space, target.scores, cfg, naive.option_mass), cfg)
    t_rs = time.perf_counter() - t0

    print(f"{target.name}: naive L1 {naive.loss(target.scores):.2f}; budget {cfg.budget}, popsize {cfg.popsize}, "
          f"dim {cfg.dim}, tokens {cfg.tokens}, scale {cfg.scale}, seed {cfg.seed}")
    print(f"{'evaluations':>12}{'DE':>10}{'random':>10}")
    rs = dict(rs_curve)
    for n, loss in de_curve:
        print(f"{n:>12}{loss:>10.2f}{rs.get(n, float('nan')):>10.2f}")
    print(f"final: DE {de_curve[-1][1]:.2f} ({t_de:.0f} s) vs random search {rs_curve[-1][1]:.2f} ({t_rs:.0f} s); "
          f"DE / random = {de_curve[-1][1] / rs_curve[-1][1]:.3f}")


if __name__ == "__main__":
    main()
