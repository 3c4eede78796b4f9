"""Survey scoring speed on the embedded SmolLM2: candidate soft prompts scored per second (24 items each).

Compared in the same run against
  (a) a naive peer: one `generate` per item, the answer parsed from the text (what a generate-and-parse loop does);
  (b) culign's batched forward WITHOUT the shared-prefix KV cache (every item's full prompt, logits at the end);
  (c) the machine's own bf16 matmul rate, to report achieved GFLOP/s (2 x params x tokens) as a fraction of it.

    python bench/score.py [--candidates 32] [--tokens 8] [--naive-candidates 1]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8, help="virtual tokens per soft prompt")
    ap.add_argument("--naive-candidates", type=int, default=1)
    args = ap.parse_args()

    rt = Runtime.load()  # bf16 on CPU, as training runs
    survey = Survey.load()
    scorer = SurveyScorer(rt, survey, ["standard"])
    g = torch.Generator().manual_seed(0)
    std = float(rt.embedding_matrix.float().std())
    prompts = torch.randn(args.candidates, args.tokens, rt.hidden_size, generator=g) * std
    params = sum(p.numel() for p in rt.model.parameters())
    embed = rt.embedding_matrix.numel()
    print(f"model {rt.name} ({params / 1e6:.0f}M params, {embed / 1e6:.0f}M of them the tied embedding), "
          f"{rt.dtype}, {torch.get_num_threads()} threads")

    # culign: shared-prefix KV cache, logits at the answer position only
    t_culign = timed(lambda: scorer.score(prompts))
    groups = sum(len(p.groups) for p in scorer.prepared)
    tokens = args.candidates * (scorer.tokens_per_candidate + groups * args.tokens)
    rate = args.candidates / t_culign

    # (b) batched forward of every item's full prompt (no prefix sharing)
    pres = scorer.prepared[0].presentation
    full_ids = [rt.chat_ids(pres.messages(it), pres.prefill) for it in survey.items]
    per = max(1, 8192 // (24 * 130))

    def no_sharing():
        for s in range(0, args.candidates, per):
            rows = [(ids, p) for p in prompts[s:s + per] for ids in full_ids]
            rt.next_token_logits(rows)

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
    naive_rate = args.naive_candidates / t_naive

    mm = max(matmul_gflops(torch.bfloat16, 4096, 576, 1536), matmul_gflops(torch.bfloat16, 2048, 2048, 2048))
    mm32 = matmul_gflops(torch.float32, 2048, 2048, 2048)
    achieved = 2 * params * tokens / t_culign / 1e9
    achieved_strict = 2 * (params - embed) * tokens / t_culign / 1e9

    print(f"\n{'method':<44}{'cand/s':>9}{'tokens/cand':>13}{'vs naive':>10}")
    print(f"{'naive peer: generate + parse per item':<44}{naive_rate:>9.3f}{'':>13}{1.0:>10.1f}x"
          f"   ({sum(a is None for a in parsed)}/{len(parsed)} unparseable)")
    print(f"{'batched forward, no prefix sharing':<44}{args.candidates / t_full:>9.3f}"
          f"{full_tokens / args.candidates:>13.0f}{args.candidates / t_full / naive_rate:>10.1f}x")
    print(f"{'culign: shared-prefix cache, option logits':<44}{rate:>9.3f}{tokens / args.candidates:>13.0f}"
          f"{rate / naive_rate:>10.1f}x")
    print(f"\nmatmul rate in this run: bf16 {mm:.0f} GFLOP/s, fp32 {mm32:.0f} GFLOP/s")
    print(f"culign achieved {achieved:.0f} GFLOP/s (2 x all params x tokens) = {achieved / mm:.0%} of the bf16 "
          f"matmul rate; {achieved_strict:.0f} GFLOP/s = {achieved_strict / mm:.0%} counting non-embedding params")
    print(f"ratios: {rate / naive_rate:.1f}x the naive peer (goal >= 20x), "
          f"{t_full / t_culign:.2f}x the unshared batched forward, {achieved / mm:.0%} of bf16 matmul (goal >= 50%)")


if __name__ == "__main__":
    main()
