"""Survey scoring speed on the embedded SmolLM2, and the levers of the robust objective, measured in one run.

Per precision (float32, the scoring default; bfloat16 where the CPU has it natively, or when asked):
  today's path   16 candidates on the one presentation the committed adapters were trained on (vsm/chat/asc)
  robust set     the same 16 candidates on each of the 9 default training presentations
  bf16 + fp32 head   (bf16 only) the trunk in bf16, the final norm, head and softmax in float32: speed, and how far
                 a 0.1 % nudge of the prompt moves the indices (rounding noise the search would chase)
  peer           generate-and-parse: one `generate` per item, the first digit parsed from the text
the label read-out's cost against the digit one (`--readout-candidates` candidates on vsm/label_chat/asc and on
vsm/chat/asc, the same wording with and without digits; float32), and the machine's own matmul rate in that precision, to report achieved GFLOP/s (2 x params x tokens) as a
fraction of it. The remaining levers are counted from the prepared token trees: padding inside suffix batches,
and the prefix that presentations sharing a template could share. The cost of a whole robust run (subsets of
presentations per generation, paired re-scoring, elites) is bench/train.py's job.

    python bench/score.py [--candidates 16] [--dtype float32 --dtype bfloat16] [--naive-candidates 1]
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

from culign.evaluation import presentation_scores
from culign.model import GenerationRequest, Runtime, cpu_bf16_native, cpu_capability, decoding
from culign.scorer import SurveyScorer
from culign.survey import DEFAULT_SPLIT, DIMENSIONS, Survey

TODAY = "vsm/chat/asc"


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up: oneDNN builds its kernels for each new shape on first use
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / timed(lambda: a @ b, repeat=10) / 1e9


def nudge_noise(rt: Runtime, survey: Survey, scorer: SurveyScorer, prompts: torch.Tensor) -> float:
    """Mean over indices of the std across 8 copies of one prompt, each nudged by 0.1 % of its size."""
    g = torch.Generator().manual_seed(7)
    base = prompts[0]
    nudged = torch.stack([base + 1e-3 * base.abs().mean() * torch.randn(base.shape, generator=g) for _ in range(8)])
    per = presentation_scores(survey, scorer.answers(nudged, [TODAY]), {"PDI": 0.0})
    return statistics.mean(statistics.pstdev([p[TODAY].indices[d] for p in per]) for d in DIMENSIONS)


def measure(dtype: str, variant: str, args, survey: Survey) -> dict:
    # bf16 "plain" is the trunk, norm and head all in bf16 (culign before 0.2); "fp32-head" is today's bf16 path
    rt = Runtime.load(dtype=dtype, scoring=True, fp32_answer=(variant == "fp32-head") if dtype != "float32" else None)
    train = list(DEFAULT_SPLIT.train)
    scorer = SurveyScorer(rt, survey, train, answer_cache=None)
    g = torch.Generator().manual_seed(0)
    std = float(rt.embedding_matrix.float().std())
    prompts = torch.randn(args.candidates, args.tokens, rt.hidden_size, generator=g) * std
    params = sum(p.numel() for p in rt.model.parameters())
    groups = {n: len(p.groups) for n, p in scorer.prepared.items()}
    tokens = {n: scorer.tokens(n) + (groups[n] + 1) * args.tokens for n in train}  # virtual tokens per forward

    t_today = timed(lambda: scorer.answers(prompts, [TODAY]))
    out = {"dtype": dtype, "variant": variant, "today_rate": args.candidates / t_today,
           "today_gflops": 2 * params * tokens[TODAY] * args.candidates / t_today / 1e9,
           "noise": nudge_noise(rt, survey, scorer, prompts)}
    if not args.quick:
        t0 = time.perf_counter()
        scorer.answers(prompts, train)
        t_all = time.perf_counter() - t0
        out["robust_rate"] = args.candidates * len(train) / t_all
        out["robust_gflops"] = 2 * params * sum(tokens.values()) * args.candidates / t_all / 1e9
    if variant == "plain":
        pres = survey.presentation(TODAY)

        def peer():
            answers = []
            for p in prompts[: args.naive_candidates]:
                for it in survey.items:
                    ids = decoding.generate(rt, [GenerationRequest(rt.chat_ids(pres.messages(it.id)), p, max_new_tokens=8)])[0]
                    m = re.search(r"[1-5]", rt.tokenizer.decode(ids, skip_special_tokens=True))
                    answers.append(int(m.group()) if m else None)
            return answers

        t0 = time.perf_counter()
        parsed = peer()
        out["peer_rate"] = args.naive_candidates / (time.perf_counter() - t0)
        out["unparseable"] = f"{sum(a is None for a in parsed)}/{len(parsed)}"
        out["matmul"] = max(matmul_gflops(rt.dtype, 4096, 576, 1536), matmul_gflops(rt.dtype, 2048, 2048, 2048))
        out["padding"] = {n: sum(len(gr.suffixes) * max(map(len, gr.suffixes)) - sum(map(len, gr.suffixes))
                                 for gr in p.groups) / p.tokens for n, p in scorer.prepared.items()}
        by_template: dict[str, list[int]] = {}
        for n, p in scorer.prepared.items():
            by_template.setdefault(n.split("/")[1], []).append(len(p.shared) + args.tokens)
        out["sharable"] = sum(sum(v) - v[0] for v in by_template.values()) / sum(tokens.values())
        out["tokens"] = tokens
    return out


def readout_cost(args, survey: Survey) -> dict:
    """Seconds per presentation-evaluation (one candidate on one presentation) of each read-out, and the tokens one
    candidate costs there (the label read-out's continuations counted)."""
    rt = Runtime.load(dtype="float32", scoring=True)
    names = {"digit": TODAY, "label": "vsm/label_chat/asc"}
    scorer = SurveyScorer(rt, survey, list(names.values()), answer_cache=None)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(args.readout_candidates, args.tokens, rt.hidden_size, generator=g) * \
        float(rt.embedding_matrix.float().std())
    out = {}
    for readout, name in names.items():
        t = timed(lambda: scorer.answers(prompts, [name]))
        out[readout] = {"presentation": name, "s_per_eval": t / args.readout_candidates, "tokens": scorer.tokens(name)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8, help="virtual tokens per soft prompt")
    ap.add_argument("--naive-candidates", type=int, default=1)
    ap.add_argument("--dtype", action="append", default=None,
                    help="dtypes to measure (repeatable; default: float32, and bfloat16 where the CPU has it natively)")
    ap.add_argument("--quick", action="store_true", help="skip the 9-presentation measurement")
    ap.add_argument("--readout-candidates", type=int, default=8,
                    help="candidates for the label-vs-digit read-out cost (0 skips it)")
    ap.add_argument("--readout-only", action="store_true", help="measure only the read-out cost")
    args = ap.parse_args()
    if args.readout_only:
        _print_readout_cost(readout_cost(args, Survey.load()), args)
        return
    dtypes = args.dtype or (["float32", "bfloat16"] if cpu_bf16_native() else ["float32"])
    survey = Survey.load()
    print(f"CPU: {cpu_capability()}; SmolLM2-135M-Instruct, {args.candidates} candidates x 24 items, "
          f"{args.tokens} virtual tokens")
    runs = []
    for d in dtypes:
        runs.append(measure(d, "plain", args, survey))
        if d == "bfloat16":
            runs.append(measure(d, "fp32-head", args, survey))
    base = runs[0]
    print(f"\n{'precision':<22}{'path':<34}{'pres-evals/s':>13}{'vs today':>10}{'GFLOP/s':>9}{'noise':>8}")
    for r in runs:
        label = r["dtype"] + (" + fp32 head" if r["variant"] == "fp32-head" else "")
        print(f"{label:<22}{'today: ' + TODAY:<34}{r['today_rate']:>13.3f}{r['today_rate'] / base['today_rate']:>9.2f}x"
              f"{r['today_gflops']:>9.0f}{r['noise']:>8.2f}")
        if "robust_rate" in r:
            print(f"{'':<22}{'9 training presentations':<34}{r['robust_rate']:>13.3f}"
                  f"{r['robust_rate'] / base['today_rate']:>9.2f}x{r['robust_gflops']:>9.0f}")
    print("noise = mean over the six indices of their std across 8 copies of one prompt nudged by 0.1 % "
          "(rounding the search would chase; a real prompt effect is a few points)")
    print()
    for r in runs:
        if r["variant"] != "plain":
            continue
        rate = r.get("robust_gflops", r["today_gflops"])
        print(f"{r['dtype']}: matmul {r['matmul']:.0f} GFLOP/s on this CPU; scoring achieved {rate:.0f} GFLOP/s = "
              f"{rate / r['matmul']:.0%} of it (goal >= 50%); {r['today_rate'] / r['peer_rate']:.1f}x the "
              f"generate-and-parse peer ({r['peer_rate']:.3f} cand/s, {r['unparseable']} unparseable; goal >= 20x)")
    r = runs[0]
    pad = statistics.mean(r["padding"].values())
    print(f"levers counted, not run: suffix padding is {pad:.1%} of the real tokens (mean over the 9; bucketing "
          f"suffixes by length could save at most that); presentations sharing a template could share "
          f"{r['sharable']:.1%} of the tokens (soft prompt + system turn)")
    print(f"tokens per candidate: {TODAY} {r['tokens'][TODAY]}, the 9 training presentations "
          f"{statistics.mean(r['tokens'].values()):.0f} on average")
    if args.readout_candidates:
        _print_readout_cost(readout_cost(args, survey), args)


def _print_readout_cost(cost: dict, args) -> None:
    d, lab = cost["digit"], cost["label"]
    print(f"\nread-out cost (float32, {args.readout_candidates} candidates, {cpu_capability()}):")
    for readout, c in cost.items():
        print(f"  {readout:<6} {c['presentation']:<22} {c['s_per_eval']:.3f} s per presentation-evaluation, "
              f"{c['tokens']} tokens per candidate")
    print(f"  label / digit: {lab['s_per_eval'] / d['s_per_eval']:.2f}x the time, {lab['tokens'] / d['tokens']:.2f}x "
          "the tokens (the five labels are continuations on the item's KV cache: only their own tokens are added)")


if __name__ == "__main__":
    main()
