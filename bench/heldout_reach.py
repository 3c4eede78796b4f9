"""How low can any soft prompt in the search space bring the held-out loss? An oracle, to tell "out of reach for
this model" apart from "the search or its objective failed".

N prompts drawn uniformly from the same prompt space `culign train` searches (persona init, seed 0, the default
dim / scale / bound; z = 0 is the persona line itself) are scored on every held-out presentation of the default
split, and the best held-out loss any of them reached is printed beside the naive and persona baselines and,
where the registry has one, the committed adapter. The oracle *chooses with the held-out set*: it is a bound to
read, never a way to pick a prompt (nothing here is saved or fed back into training).

    python bench/heldout_reach.py [--regions US,CN,IN,SA] [--prompts 8] [--adapters-dir adapters]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from culign.evaluation import Evaluator, Respondent, family_mean, presentation_scores
from culign.optimize import PromptSpace, SearchConfig, initial_prompt
from culign.registry import Registry, RegistryError
from culign.runtime import Runtime, cpu_capability
from culign.survey import DEFAULT_SPLIT, Survey, persona_line
from culign.targets import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", default="US,CN,IN,SA")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters-dir", default="adapters")
    args = ap.parse_args()

    rt = Runtime.load(scoring=True)
    survey, split = Survey.load(), DEFAULT_SPLIT
    held = split.heldout_names
    registry = Registry(args.adapters_dir)
    print(f"CPU: {cpu_capability()}; {args.prompts} prompts from the search space x {len(held)} held-out "
          f"presentations per region")
    print(f"{'region':<8}{'naive':>8}{'persona':>9}{'adapter':>9}{'oracle best':>13}{'oracle median':>15}"
          f"{'oracle worst':>14}{'s':>6}")
    for region in args.regions.split(","):
        t0 = time.perf_counter()
        target = resolve(region.strip())
        evaluator = Evaluator(rt, survey, target, split)
        naive = evaluator.evaluate(Respondent.naive(), held).heldout_loss
        persona = evaluator.evaluate(Respondent.with_persona(target.display_name), held).heldout_loss
        try:
            adapter = registry.load(target.key, hidden_size=rt.hidden_size, base_fingerprint=rt.fingerprint)
            adapter_loss = evaluator.evaluate(Respondent("adapter", adapter.prompt), held).heldout_loss
        except (RegistryError, KeyError, FileNotFoundError):
            adapter_loss = None
        cfg = SearchConfig(seed=args.seed)
        space = PromptSpace(initial_prompt(rt, cfg, persona_line(target.display_name)), cfg,
                            float(rt.embedding_matrix.float().std()))
        z = np.random.default_rng([args.seed, 7]).uniform(-cfg.bound, cfg.bound, size=(args.prompts, cfg.dim))
        scorer = evaluator.scorer(None)
        per_prompt = [dict() for _ in range(args.prompts)]
        for name in held:
            answers = scorer.answers(space.prompts(z), [name])
            for s, scores in enumerate(presentation_scores(survey, answers, target.scores)):
                per_prompt[s][name] = scores[name]
        losses = sorted(family_mean(p, split.heldout)[0] for p in per_prompt)
        a = "-" if adapter_loss is None else f"{adapter_loss:.2f}"
        print(f"{target.key:<8}{naive:>8.2f}{persona:>9.2f}{a:>9}{losses[0]:>13.2f}{np.median(losses):>15.2f}"
              f"{losses[-1]:>14.2f}{time.perf_counter() - t0:>6.0f}")
    print("held-out loss = mean over the held-out families of each family's mean L1 (as every report computes it)")


if __name__ == "__main__":
    main()
