"""Survey scoring speed on the embedded SmolLM2: candidate soft prompts scored per second (24 items each).

Compared in the same run against
  (a) a naive peer: one `generate` per item, the answer parsed from the text (what a generate-and-parse loop does);
  (b) culign's batched forward WITHOUT the shared-prefix KV cache (every item's full prompt, logits at the end);
  (c) the machine's own matmul rate in the same dtype, to report achieved GFLOP/s (2 x params x tokens) as a fraction.
Run in float32 (the scoring default) and in bfloat16.

    python bench/score.py [--candidates 32] [--tokens 8] [--naive-candidates 1] [--dtype float32 --dtype bfloat16]
"""
from __future__ import annotations

import argparse
import re
import time

import torch

from culign.runtime import GenerationRequest, Runtime
from culign.scorer import SurveyScorer
from culign.survey import Survey


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up: oneDNN builds its kernels for each new shape on first use
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / timed(lambda: a @ b, repeat=10) / 1e9


def measure(dtype: str, args) -> dict:
    """Scoring speed in one dtype: culign vs the unshared batched forward vs the generate-and-parse peer."""
    rt = Runtime.load(dtype=dtype, scoring=True)
    survey = Survey.load()
    scorer = SurveyScorer(rt, survey, ["standard"])
    g = torch.Generator().manual_seed(0)
    std = float(rt.embedding_matrix.float().std())
    prompts = torch.randn(args.candidates, args.tokens, rt.hidden_size, generator=g) * std
    params = sum(p.numel() for p in rt.model.parameters())
    embed = rt.embedding_matrix.numel()

    # culign: shared-prefix KV cache, fixed blocks of candidates, logits at the answer position only
    t_culign = timed(lambda: scorer.score(prompts))
    groups = sum(len(p.groups) for p in scorer.prepared)
    tokens = args.candidates * (scorer.tokens_per_candidate + groups * args.tokens)

    # (b) batched forward of every item's full prompt (no prefix sharing), blocks of `scorer.block` candidates
    pres = scorer.prepared[0].presentation
    full_ids = [rt.chat_ids(pres.messages(it), pres.prefill) for it in survey.items]

    def no_sharing():
        for s in range(0, args.candidates, scorer.block):
            rt.next_token_logits([(ids, p) for p in prompts[s:s + scorer.block] for ids in full_ids])

    t_full = timed(no_sharing)
    full_tokens = args.candidates * sum(len(i) + args.tokens for i in full_ids)

    # (a) naive peer: generate per item, parse the first digit
    def naive():
        answers = []
        for p in prompts[: args.naive_candidates]:
            for it in survey.items:
                ids = rt.generate([GenerationRequest(rt.chat_ids(pres.messages(it)), p, max_new_tokens=8)])[0]
                m = re.search(r"[1-5]", rt.tokenizer.decode(ids, skip_special_tokens=True))
                answers.append(int(m.group()) if m else None)
        return answers

    t0 = time.perf_counter()
    parsed = naive()
    t_naive = time.perf_counter() - t0
    torch_dtype = rt.dtype
    mm = max(matmul_gflops(torch_dtype, 4096, 576, 1536), matmul_gflops(torch_dtype, 2048, 2048, 2048))
    return {"dtype": str(torch_dtype).removeprefix("torch."), "rate": args.candidates / t_culign,
            "tokens": tokens / args.candidates, "full_rate": args.candidates / t_full,
            "full_tokens": full_tokens / args.candidates, "naive_rate": args.naive_candidates / t_naive,
            "unparseable": sum(a is None for a in parsed), "asked": len(parsed), "matmul": mm,
            "achieved": 2 * params * tokens / t_culign / 1e9,
            "achieved_strict": 2 * (params - embed) * tokens / t_culign / 1e9,
            "params": params, "embed": embed, "block": scorer.block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8, help="virtual tokens per soft prompt")
    ap.add_argument("--naive-candidates", type=int, default=1)
    ap.add_argument("--dtype", action="append", default=None,
                    help="dtypes to measure (repeatable; default: float32, the scoring default, and bfloat16)")
    args = ap.parse_args()

    runs = [measure(d, args) for d in (args.dtype or ["float32", "bfloat16"])]
    r0 = runs[0]
    print(f"model SmolLM2-135M-Instruct ({r0['params'] / 1e6:.0f}M params, {r0['embed'] / 1e6:.0f}M of them the tied "
          f"embedding), {torch.get_num_threads()} threads, {args.candidates} candidates x 24 items, "
          f"blocks of {r0['block']}")
    print(f"\n{'dtype':<10}{'method':<44}{'cand/s':>9}{'tokens/cand':>13}{'vs naive':>10}")
    for r in runs:
        print(f"{r['dtype']:<10}{'naive peer: generate + parse per item':<44}{r['naive_rate']:>9.3f}{'':>13}"
              f"{1.0:>10.1f}x   ({r['unparseable']}/{r['asked']} unparseable)")
        print(f"{'':<10}{'batched forward, no prefix sharing':<44}{r['full_rate']:>9.3f}{r['full_tokens']:>13.0f}"
              f"{r['full_rate'] / r['naive_rate']:>10.1f}x")
        print(f"{'':<10}{'culign: shared-prefix cache, option logits':<44}{r['rate']:>9.3f}{r['tokens']:>13.0f}"
              f"{r['rate'] / r['naive_rate']:>10.1f}x")
    print()
    for r in runs:
        print(f"{r['dtype']}: matmul rate in this run {r['matmul']:.0f} GFLOP/s; culign achieved {r['achieved']:.0f} "
              f"GFLOP/s (2 x all params x tokens) = {r['achieved'] / r['matmul']:.0%} of it, "
              f"{r['achieved_strict'] / r['matmul']:.0%} counting non-embedding params only")
    for r in runs:
        print(f"ratios ({r['dtype']}): {r['rate'] / r['naive_rate']:.1f}x the naive peer (goal >= 20x), "
              f"{r['rate'] / r['full_rate']:.2f}x the unshared batched forward, {r['achieved'] / r['matmul']:.0%} of "
              f"the same-dtype matmul rate (goal >= 50%)")
    if len(runs) > 1:
        print(f"bf16 / float32 scoring speed: {runs[-1]['rate'] / runs[0]['rate']:.2f}x (float32 is the default: "
              "bf16 rounding noise is as large as a soft prompt's effect on the indices; see README)")


if __name__ == "__main__":
    main()
