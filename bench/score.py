"""Survey scoring speed per search precision, its fidelity to float32 and the robust objective's levers, in one run.

Per precision (fp32, the reference; bf16 and int8, culign.model.precision, made from the float32 model as a search
makes them; a precision whose linear layers run below 0.5x float32's rate here is skipped unless named), for each
read-out (digit: vsm/chat/asc; label: vsm/label_chat/asc, the same wording):
  speed      `--candidates` candidates x 24 items: candidates/s (= presentation-evaluations/s on one presentation),
             achieved GFLOP/s (2 x decoder-layer parameters x real tokens) against this CPU's own rate for the
             model's MLP linear in that precision, measured in this run, and the ratio to float32 in this run
  robust set (digit, not --quick) the same candidates on each of the 9 default training presentations
  noise      how far a 0.1 % nudge of one prompt moves the indices (rounding the search would chase)
  fidelity   culign.fidelity's check: `--fidelity-candidates` random candidates of the search space on the read-out's
             first training presentation, the training objective against the validity panel's 8 targets: Spearman
             of the losses (worst target; passes at >= 0.95), max index difference, same best candidate
  --de       a DE run (fixed seed, small budget, the read-out's default training presentations) searched in each
             precision, its result re-scored in float32: the final float32 losses side by side
then, in float32: the generate-and-parse peer, padding and sharable-prefix levers, and the label read-out's cost
(`--readout-candidates`). The cost of a whole robust run (subsets, paired re-scoring, elites) is bench/train.py's.

    python bench/score.py [--model embedded:Qwen2.5-Coder-1.5B-Instruct] [--quick] [--de] [--precision bf16 ...]
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from culign import fidelity
from culign.evaluation import presentation_scores
from culign.model import GenerationRequest, Runtime, cpu_capability, decoding, precision
from culign.model.hardware import cpu_model_name
from culign.optimize import SearchConfig
from culign.scorer import SurveyScorer
from culign.survey import DEFAULT_SPLIT, DEFAULT_SPLITS, DIMENSIONS, Split, Survey

TODAY = "vsm/chat/asc"
PRESENTATION = {"digit": TODAY, "label": "vsm/label_chat/asc"}
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "int8": "int8"}


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up: oneDNN builds its kernels for each new shape on first use
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def matmul_rate(name: str, rt: Runtime) -> float:
    """This CPU's rate for the model's MLP linear (hidden -> intermediate, 4096 rows) in precision ``name``."""
    k = rt.hidden_size
    n = int(getattr(rt.model.config, "intermediate_size", None) or 4 * k)
    return max(precision.linear_rate(name, 4096, k, n, repeat=3) for _ in range(2))


def nudge_noise(survey: Survey, scorer: SurveyScorer, prompts: torch.Tensor) -> float:
    """Mean over indices of the std across 8 copies of one prompt, each nudged by 0.1 % of its size."""
    g = torch.Generator().manual_seed(7)
    base = prompts[0]
    nudged = torch.stack([base + 1e-3 * base.abs().mean() * torch.randn(base.shape, generator=g) for _ in range(8)])
    per = presentation_scores(survey, scorer.answers(nudged, [TODAY]), {"PDI": 0.0})
    return statistics.mean(statistics.pstdev([p[TODAY].indices[d] for p in per]) for d in DIMENSIONS)


def measure(rt: Runtime, name: str, args, survey: Survey, prompts: torch.Tensor, params: int) -> dict:
    srt = precision.search_runtime(rt, name)
    out = {"precision": name, "matmul": matmul_rate(name, rt), "rows": {}}
    for readout in args.readout:
        pres = PRESENTATION[readout]
        scorer = SurveyScorer(srt, survey, [pres], answer_cache=None)
        tokens = scorer.tokens(pres) + (len(scorer.prepared[pres].groups) + 1) * args.tokens  # + virtual tokens
        t = timed(lambda: scorer.answers(prompts, [pres]))
        rate = args.candidates / t
        out["rows"][readout] = {"presentation": pres, "rate": rate, "evals": rate,
                                "gflops": 2 * params * tokens * args.candidates / t / 1e9}
    if "digit" in args.readout:
        scorer = SurveyScorer(srt, survey, list(DEFAULT_SPLIT.train), answer_cache=None)
        out["noise"] = nudge_noise(survey, scorer, prompts)
        if not args.quick:
            tokens = sum(scorer.tokens(n) + (len(scorer.prepared[n].groups) + 1) * args.tokens
                         for n in DEFAULT_SPLIT.train)
            t0 = time.perf_counter()
            scorer.answers(prompts, list(DEFAULT_SPLIT.train))
            t = time.perf_counter() - t0
            out["rows"]["digit, 9 training"] = {"presentation": "the 9 training presentations",
                                                "rate": args.candidates / t,
                                                "evals": args.candidates * len(DEFAULT_SPLIT.train) / t,
                                                "gflops": 2 * params * tokens * args.candidates / t / 1e9}
    return out


def fidelity_numbers(rt: Runtime, names: list[str], args, survey: Survey) -> dict:
    """Per read-out: float32's scores of the sample once, then each precision's, compared (never from the cache)."""
    cfg = SearchConfig(tokens=args.tokens)
    out = {}
    for readout in args.readout:
        train = list(DEFAULT_SPLITS[readout].train)
        pres = fidelity.check_presentations(train, args.fidelity_presentations)
        kw = dict(n=args.fidelity_candidates, use_cache=False)
        ref, _ = fidelity.score(rt, survey, "fp32", pres, cfg, **kw)
        mass = fidelity.naive_mass(rt, survey, pres)
        for name in names:
            if name != "fp32":
                other, _ = fidelity.score(rt, survey, name, pres, cfg, **kw)
                out[(name, readout)] = fidelity.compare(survey, ref, other, mass, cfg)
                gc.collect()
    return out


def de_runs(rt: Runtime, names: list[str], args, survey: Survey) -> dict:
    """A DE run per precision with the same seed and budget, its result re-scored alone in float32 (the trainer's
    path: the precision given as a made Choice, so no check runs here)."""
    from culign.registry import Registry
    from culign.targets import resolve
    from culign.trainer import TrainSettings, train

    split = Split(tuple(DEFAULT_SPLITS[args.de_readout].train))
    cfg = SearchConfig(budget=args.de_budget, popsize=args.de_popsize, seed=args.de_seed, tokens=args.tokens)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            choice = fidelity.Choice(name, name, "bench/score.py --de")
            settings = TrainSettings(search=cfg, split=split, search_precision=choice)
            r = train(rt, survey, resolve(args.region), settings, Registry(Path(tmp) / name), progress=False,
                      checkpoint_dir=Path(tmp) / "runs", echo=lambda _m: None).report
            out[name] = r
            gc.collect()
    return out


def peer_rate(rt: Runtime, survey: Survey, prompts: torch.Tensor, n: int) -> tuple[float, str]:
    """Generate-and-parse: one `generate` per item, the first digit parsed from the text (float32)."""
    pres = survey.presentation(TODAY)
    t0 = time.perf_counter()
    answers = []
    for p in prompts[:n]:
        for it in survey.items:
            ids = decoding.generate(rt, [GenerationRequest(rt.chat_ids(pres.messages(it.id)), p, max_new_tokens=8)])[0]
            m = re.search(r"[1-5]", rt.tokenizer.decode(ids, skip_special_tokens=True))
            answers.append(int(m.group()) if m else None)
    return n / (time.perf_counter() - t0), f"{sum(a is None for a in answers)}/{len(answers)}"


def levers(rt: Runtime, survey: Survey, args) -> dict:
    train = list(DEFAULT_SPLIT.train)
    scorer = SurveyScorer(rt, survey, train, answer_cache=None)
    tokens = {n: scorer.tokens(n) + (len(p.groups) + 1) * args.tokens for n, p in scorer.prepared.items()}
    padding = {n: sum(len(gr.suffixes) * max(map(len, gr.suffixes)) - sum(map(len, gr.suffixes))
                      for gr in p.groups) / p.tokens for n, p in scorer.prepared.items()}
    by_template: dict[str, list[int]] = {}
    for n, p in scorer.prepared.items():
        by_template.setdefault(n.split("/")[1], []).append(len(p.shared) + args.tokens)
    sharable = sum(sum(v) - v[0] for v in by_template.values()) / sum(tokens.values())
    return {"padding": statistics.mean(padding.values()), "sharable": sharable, "tokens": tokens}


def readout_cost(rt: Runtime, args, survey: Survey) -> dict:
    """Seconds per presentation-evaluation (one candidate on one presentation) of each read-out, and the tokens one
    candidate costs there (the label read-out's continuations counted); float32."""
    scorer = SurveyScorer(rt, survey, list(PRESENTATION.values()), answer_cache=None)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(args.readout_candidates, args.tokens, rt.hidden_size, generator=g) * \
        float(rt.embedding_matrix.float().std())
    out = {}
    for readout, name in PRESENTATION.items():
        t = timed(lambda: scorer.answers(prompts, [name]))
        out[readout] = {"presentation": name, "s_per_eval": t / args.readout_candidates, "tokens": scorer.tokens(name)}
    return out


def chosen_precisions(rt: Runtime, args) -> tuple[list[str], list[str]]:
    """(precisions to measure, lines saying why others are not): named ones always; by default every available
    one whose linear layers run at >= fidelity.PROBE_MIN x float32's rate here (bf16 emulated on AVX2: ~0.02x)."""
    named = [DTYPE_NAMES.get(d, d) for d in (args.precision or []) + (args.dtype or [])]
    names, notes = ["fp32"], []
    for name in precision.PRECISIONS:
        if name == "fp32" or (named and name not in named):
            continue
        why = precision.unavailable(name, rt)
        if why is None and name not in named:
            ratio = fidelity.probe(rt, name)
            if ratio < fidelity.PROBE_MIN:
                why = f"its MLP linear runs at {ratio:.2f}x float32's rate here (< {fidelity.PROBE_MIN}); " \
                      f"--precision {name} measures it anyway"
        if why:
            notes.append(f"{name}: not measured: {why}")
        else:
            names.append(name)
    return names, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="any model culign loads (default: the embedded SmolLM2), e.g. "
                    "embedded:Qwen2.5-Coder-1.5B-Instruct")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8, help="virtual tokens per soft prompt")
    ap.add_argument("--naive-candidates", type=int, default=1, help="candidates for the generate-and-parse peer "
                    "(0 skips it)")
    ap.add_argument("--precision", action="append", default=None, choices=list(precision.PRECISIONS),
                    help="precisions to measure besides fp32 (repeatable; default: each one available here whose "
                         "linear layers are faster than float32's)")
    ap.add_argument("--dtype", action="append", default=None, help="the old spelling of --precision "
                    "(float32, bfloat16)")
    ap.add_argument("--readout", action="append", default=None, choices=list(PRESENTATION),
                    help="read-outs to measure (repeatable; default both)")
    ap.add_argument("--quick", action="store_true", help="skip the 9-presentation measurement")
    ap.add_argument("--fidelity-candidates", type=int, default=fidelity.CANDIDATES, help="0 skips the check")
    ap.add_argument("--fidelity-presentations", type=int, default=fidelity.PRESENTATIONS)
    ap.add_argument("--de", action="store_true", help="also a DE run per precision, re-scored in float32")
    ap.add_argument("--de-budget", type=int, default=48)
    ap.add_argument("--de-popsize", type=int, default=16)
    ap.add_argument("--de-seed", type=int, default=0)
    ap.add_argument("--de-readout", default="digit", choices=list(PRESENTATION))
    ap.add_argument("--region", default="US", help="the --de run's target")
    ap.add_argument("--readout-candidates", type=int, default=8,
                    help="candidates for the label-vs-digit read-out cost (0 skips it)")
    ap.add_argument("--readout-only", action="store_true", help="measure only the read-out cost")
    args = ap.parse_args()
    args.readout = args.readout or list(PRESENTATION)
    survey = Survey.load()
    rt = Runtime.load(args.model, dtype="float32", scoring=True)
    if args.readout_only:
        _print_readout_cost(readout_cost(rt, args, survey), args)
        return
    # FLOPs: 2 x the decoder layers' parameters x real tokens (the embedding is a lookup; the head runs at answer
    # positions only; attention's own products are left out): the work every precision does alike
    outside = {id(p) for m in (rt.model.get_input_embeddings(), rt.model.get_output_embeddings())
               for p in m.parameters()}
    params = sum(p.numel() for p in rt.model.parameters() if id(p) not in outside)
    total = sum(p.numel() for p in rt.model.parameters())
    names, notes = chosen_precisions(rt, args)
    print(f"CPU: {cpu_model_name()}; {cpu_capability()}; torch {torch.__version__}\nmodel: {rt.name} "
          f"({total / 1e6:.0f}M parameters, {params / 1e6:.0f}M in the decoder layers); {args.candidates} candidates "
          f"x 24 items, {args.tokens} virtual tokens")
    for line in notes:
        print(f"  {line}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(args.candidates, args.tokens, rt.hidden_size, generator=g) * \
        float(rt.embedding_matrix.float().std())
    runs = []
    for name in names:
        runs.append(measure(rt, name, args, survey, prompts, params))
        gc.collect()  # the search copy goes before the next one is made
    base = runs[0]
    print(f"\n{'precision':<10}{'read-out':<20}{'cand/s':>8}{'evals/s':>9}{'vs fp32':>9}{'GFLOP/s':>9}"
          f"{'matmul':>8}{'of it':>7}{'noise':>7}")
    for r in runs:
        for i, (readout, row) in enumerate(r["rows"].items()):
            ratio = row["evals"] / base["rows"][readout]["evals"]
            noise = f"{r['noise']:>7.2f}" if i == 0 and "noise" in r else ""
            print(f"{r['precision'] if i == 0 else '':<10}{readout:<20}{row['rate']:>8.3f}{row['evals']:>9.3f}"
                  f"{ratio:>8.2f}x{row['gflops']:>9.0f}{r['matmul']:>8.0f}{row['gflops'] / r['matmul']:>7.0%}{noise}")
    print("cand/s: candidates scored per second on the row's presentation(s) (DE's candidates/s at --subset 1 is "
          "the one-presentation figure); GFLOP/s: 2 x decoder-layer parameters x real tokens per second; matmul: this "
          "CPU's GFLOP/s for the model's MLP linear in the row's precision, measured now; noise: mean over the six "
          "indices of their std across 8 copies of one prompt nudged by 0.1 % (a real prompt effect is a few points)")

    if args.fidelity_candidates and len(names) > 1:
        fids = fidelity_numbers(rt, names, args, survey)
        print(f"\nfidelity to float32 ({args.fidelity_candidates} random candidates of the search space, "
              f"{args.fidelity_presentations} presentation(s) per read-out, the training objective against the "
              f"validity panel's 8 targets; passes at Spearman >= {fidelity.SPEARMAN_MIN}):")
        print(f"  {'read-out':<10}{fidelity.HEADER}")
        for (name, readout), f in fids.items():
            print(f"  {readout:<10}{f.line()}   ({f.presentations[0]}; fp32 {f.reference_rate:.2f} evals/s)")

    if args.de:
        reports = de_runs(rt, names, args, survey)
        r0 = next(iter(reports.values()))
        print(f"\nDE, seed {args.de_seed}, budget {args.de_budget}, popsize {args.de_popsize}, region {args.region}, "
              f"{args.de_readout} read-out, its {len(DEFAULT_SPLITS[args.de_readout].train)} default training "
              f"presentations (naive {r0['naive_loss']:.2f}, persona {r0['icl_loss']:.2f} float32 train L1):")
        print(f"  {'precision':<10}{'search objective':>17}{'float32 train L1':>18}{'search wall':>13}"
              f"{'evals':>7}")
        for name, r in reports.items():
            print(f"  {name:<10}{r['objective']:>17.3f}{r['train_loss']:>18.3f}{r['search_wall_time_s']:>12.0f}s"
                  f"{r['presentation_evaluations']:>7}")
        print("  search objective: the result's training objective as its search scored it (in its precision); "
              "float32 train L1: the result re-scored alone in float32, as the report prints it")

    if args.naive_candidates:
        peer, unparseable = peer_rate(rt, survey, prompts, args.naive_candidates)
        digit = base["rows"].get("digit")
        if digit:
            print(f"\nfp32: {digit['rate'] / peer:.1f}x the generate-and-parse peer ({peer:.3f} cand/s, {unparseable} "
                  "unparseable; goal >= 20x)")
    lv = levers(rt, survey, args)
    print(f"levers counted, not run: suffix padding is {lv['padding']:.1%} of the real tokens (mean over the 9; "
          f"bucketing suffixes by length could save at most that); presentations sharing a template could share "
          f"{lv['sharable']:.1%} of the tokens (soft prompt + system turn)")
    print(f"tokens per candidate: {TODAY} {lv['tokens'][TODAY]}, the 9 training presentations "
          f"{statistics.mean(lv['tokens'].values()):.0f} on average")
    if args.readout_candidates:
        _print_readout_cost(readout_cost(rt, args, survey), args)


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
