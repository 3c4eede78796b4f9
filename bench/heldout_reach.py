"""How far can any soft prompt in the search space carry a training gain to the held-out presentations? An oracle
and a transfer analysis, to tell "out of reach for this model" apart from "the search or its objective failed".

N prompts drawn uniformly from the same prompt space `culign train` searches (persona init, seed 0, the default
dim / scale / bound; z = 0 is the persona line itself) are scored, with the naive model, the persona baseline and
every committed adapter version of the region, on every presentation of the default split. Printed per region:

  oracle        the best / median / worst held-out loss any of the N prompts reached. The oracle *chooses with the
                held-out set*: a bound to read, never a way to pick a prompt (nothing here is saved or fed back).
  picked by     the held-out loss of the prompt a training-side rule would have picked: the lowest training loss,
                the lowest validation loss (what `culign train` can see)
  rank corr.    Spearman's rho across the N prompts between the training loss and the held-out loss, overall and
                per held-out family: near 0 or negative, lowering the training loss does not lower that family's
  order slope   how a prompt's index moves (against the naive model) on a reversed scale follow its moves on the same
                wording and template in ascending order: the least-squares slope of desc moves on asc moves over the
                9 paired presentations x 6 indices. +1: the prompt moves what the answers *mean* (it follows the
                labels); -1: it moves which *digit* the model picks, so every gain on ascending scales is a loss on
                reversed ones

    python bench/heldout_reach.py [--regions US,CN,IN,SA] [--prompts 16] [--adapters-dir adapters] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.stats import spearmanr

from culign.evaluation import (Evaluation, Evaluator, PresentationScore, Respondent, order_slope,
                               presentation_scores)
from culign.optimize import PromptSpace, SearchConfig, initial_prompt
from culign.registry import Registry, RegistryError
from culign.model import Runtime, cpu_capability
from culign.survey import DEFAULT_SPLIT, Survey, persona_line
from culign.targets import resolve

Scores = dict[str, PresentationScore]


def summary(row: Evaluation, naive: Evaluation) -> dict:
    """The losses every report computes (Evaluation's own), and the row's order slope against naive."""
    return {"train": row.train_loss, "validation": row.validation_loss, "heldout": row.heldout_loss,
            "heldout_by_family": row.heldout_by_family, "order_slope": order_slope(row.scores, naive.scores)}


def analyse(region: str, rt: Runtime, survey: Survey, registry: Registry, n_prompts: int, seed: int) -> dict:
    split = DEFAULT_SPLIT
    target = resolve(region)
    evaluator = Evaluator(rt, survey, target, split)
    naive = evaluator.evaluate(Respondent.naive())
    rows = {"naive": summary(naive, naive),
            "persona": summary(evaluator.evaluate(Respondent.with_persona(target.display_name)), naive)}
    try:
        versions = registry.versions(target.key)
    except (RegistryError, KeyError, FileNotFoundError):
        versions = []
    for v in versions:
        adapter = registry.load(target.key, v, hidden_size=rt.hidden_size, base_fingerprint=rt.fingerprint)
        rows[f"adapter v{v}"] = summary(evaluator.evaluate(Respondent(f"v{v}", adapter.prompt)), naive)

    cfg = SearchConfig(seed=seed)
    space = PromptSpace(initial_prompt(rt, cfg, persona_line(target.display_name)), cfg,
                        float(rt.embedding_matrix.float().std()))
    z = np.random.default_rng([seed, 7]).uniform(-cfg.bound, cfg.bound, size=(n_prompts, cfg.dim))
    prompts = space.prompts(z)
    scorer = evaluator.scorer(None)
    per_prompt: list[Scores] = [{} for _ in range(n_prompts)]
    for name in split.all_names:
        for s, scores in enumerate(presentation_scores(survey, scorer.answers(prompts, [name]), target.scores)):
            per_prompt[s][name] = scores[name]
    random_rows = [summary(Evaluation(f"random {i}", target, split, p), naive) for i, p in enumerate(per_prompt)]

    train = np.array([r["train"] for r in random_rows])
    val = np.array([r["validation"] for r in random_rows])
    held = np.array([r["heldout"] for r in random_rows])
    slopes = np.array([r["order_slope"] for r in random_rows if r["order_slope"] is not None])
    rho = lambda a, b: float(spearmanr(a, b).statistic)  # noqa: E731
    return {
        "region": target.key, "prompts": n_prompts, "rows": rows, "random": random_rows,
        "oracle": {"best": float(held.min()), "median": float(np.median(held)), "worst": float(held.max()),
                   "beat_naive": int((held < rows["naive"]["heldout"]).sum()),
                   "beat_both": int((held < min(rows["naive"]["heldout"], rows["persona"]["heldout"])).sum())},
        "picked_by_train": float(held[train.argmin()]), "picked_by_validation": float(held[val.argmin()]),
        "rho_train_heldout": rho(train, held), "rho_validation_heldout": rho(val, held),
        "rho_train_family": {f: rho(train, [r["heldout_by_family"][f] for r in random_rows]) for f in split.heldout},
        "order_slope": {"median": float(np.median(slopes)), "min": float(slopes.min()), "max": float(slopes.max()),
                        "positive": int((slopes > 0).sum())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", default="US,CN,IN,SA")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters-dir", default="adapters")
    ap.add_argument("--out", help="also write every number as JSON here")
    args = ap.parse_args()

    rt = Runtime.load(scoring=True)
    survey, registry = Survey.load(), Registry(args.adapters_dir)
    print(f"CPU: {cpu_capability()}, {rt.dtype}; {args.prompts} prompts from the search space per region, each on "
          f"all {len(DEFAULT_SPLIT.all_names)} presentations of the default split", flush=True)
    results = []
    for region in args.regions.split(","):
        t0 = time.perf_counter()
        r = analyse(region.strip(), rt, survey, registry, args.prompts, args.seed)
        results.append(r)
        print(f"\n{r['region']} ({time.perf_counter() - t0:.0f} s)")
        print(f"  {'row':<14}{'train':>8}{'valid.':>8}{'held-out':>10}{'order slope':>13}   held-out by family")
        for label, row in r["rows"].items():
            slope = "-" if label == "naive" or row["order_slope"] is None else f"{row['order_slope']:+.2f}"
            fams = "  ".join(f"{f.split(':')[1]} {v:.2f}" for f, v in row["heldout_by_family"].items())
            print(f"  {label:<14}{row['train']:>8.2f}{row['validation']:>8.2f}{row['heldout']:>10.2f}{slope:>13}   "
                  f"{fams}")
        o, s = r["oracle"], r["order_slope"]
        print(f"  oracle held-out: best {o['best']:.2f}, median {o['median']:.2f}, worst {o['worst']:.2f}; "
              f"{o['beat_naive']} of {r['prompts']} below naive, {o['beat_both']} below naive and persona")
        print(f"  picked by training loss: held-out {r['picked_by_train']:.2f}; by validation loss: "
              f"{r['picked_by_validation']:.2f}")
        fams = ", ".join(f"{f} {v:+.2f}" for f, v in r["rho_train_family"].items())
        print(f"  rank corr. train/held-out {r['rho_train_heldout']:+.2f} (validation/held-out "
              f"{r['rho_validation_heldout']:+.2f}); per family: {fams}")
        print(f"  order slope of the random prompts: median {s['median']:+.2f} (range {s['min']:+.2f} to "
              f"{s['max']:+.2f}), {s['positive']} of {r['prompts']} positive")
    print("\nheld-out loss = mean over the held-out families of each family's mean L1 (as every report computes it)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_capability(), "dtype": str(rt.dtype), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
