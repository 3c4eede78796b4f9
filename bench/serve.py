"""Serving benchmark under realistic load: continuous batching vs static micro-batching vs one adapter at a time.

Drives the service's own engine in-process (culign.serving.ChatEngine: validation, adapter cache, scheduler,
detokenizing), with no HTTP in the way. Requests ask for 8..256 new tokens (uniform, fixed seed) and spread over
4 regions plus the base model. Workloads:

  poisson@R    open loop: requests arrive at R per second (exponential gaps), whatever the server's state
  closed-16    16 clients, each sending its next request when the last one is answered

Schedulers:

  continuous   the service as shipped (culign.scheduler.Scheduler): rows join at the next step, leave at once
  static       the previous design (StaticBatcher): gather for 5 ms, decode that batch to its end
  one-adapter  the peer: static batches that only ever hold one soft prompt (as PEFT serves a PromptTuning model)

Printed per (workload, scheduler): tokens/s, time to first token p50/p99, inter-token latency p50/p99, mean rows
per decode step. Goals (issue 9): TTFT p99 <= 25 % of static's at the same load, throughput >= static's, >= 3x the
one-adapter peer. Then batch invariance: random mixes of requests (regions, lengths, arrival offsets) through the
continuous scheduler, each greedy answer compared with the same request decoded alone, in float32 and bf16.

    python bench/serve.py                          # everything (~10 min on 2 cores)
    python bench/serve.py --rates 1 --requests 16 --mixes 16   # a quick look
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from culign.registry import Registry  # noqa: E402
from culign.runtime import GenerationRequest, Runtime, cpu_capability  # noqa: E402
from culign.scheduler import COMPUTE_THREADS, Job, Scheduler, StaticBatcher  # noqa: E402
from culign.serving import ChatEngine, ChatRequest, load_runtime  # noqa: E402
from culign.settings import ServiceSettings  # noqa: E402

REGIONS = ["US", "CN", "IN", "SA"]
QUESTIONS = [
    "What matters most in raising children?",
    "Should employees question their manager's decisions?",
    "How should a family make a big decision?",
    "Is it better to save money or to enjoy it now?",
    "How important is it to follow tradition?",
    "What makes a good leader?",
    "Should people show their emotions at work?",
    "How should young people treat their elders?",
]


class OneAdapterAtATime(StaticBatcher):
    """The peer: a batch's rows share one soft prompt; the other regions of a gathered batch wait their turn."""

    def _decode(self, batch: list[Job]) -> None:
        groups: dict[str, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.label, []).append(job)
        for group in groups.values():
            super()._decode(group)


WORKERS = {"continuous": Scheduler, "static": StaticBatcher, "one-adapter": OneAdapterAtATime}


def registry_for(rt: Runtime, scratch: str, virtual_tokens: int) -> Registry:
    registry, std = Registry(scratch), rt.embedding_matrix.float().std()
    for seed, region in enumerate(REGIONS):
        g = torch.Generator().manual_seed(seed)
        registry.save(region, torch.randn(virtual_tokens, rt.hidden_size, generator=g) * std,
                      base_model=rt.name, base_fingerprint=rt.fingerprint, provenance={"bench": True})
    return registry


def workload(n: int, seed: int, lo: int, hi: int) -> list[tuple[str | None, str, int]]:
    """(region or None, question, max_tokens) per request, fixed by the seed."""
    rnd = random.Random(seed)
    return [(rnd.choice([*REGIONS, None]), rnd.choice(QUESTIONS), rnd.randint(lo, hi)) for _ in range(n)]


async def one_request(engine: ChatEngine, region, question, max_tokens, out: list[dict]) -> None:
    body = ChatRequest(messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    prepared = await engine.prepare(body, [region] if region else [])
    job = engine.worker.submit(prepared.request, prepared.served_by, prepared.region)
    stamps = []
    async for _ in job.tokens():
        stamps.append(time.perf_counter())
    out.append({"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                "tokens": len(stamps)})


async def drive(engine: ChatEngine, requests, rate: float | None, clients: int, seed: int) -> list[dict]:
    out: list[dict] = []
    if rate is None:  # closed loop
        queue = list(requests)

        async def client():
            while queue:
                await one_request(engine, *queue.pop(0), out)

        await asyncio.gather(*(client() for _ in range(clients)))
    else:  # open loop: Poisson arrivals
        rnd, tasks = random.Random(seed + 1), []
        for req in requests:
            tasks.append(asyncio.ensure_future(one_request(engine, *req, out)))
            await asyncio.sleep(rnd.expovariate(rate))
        await asyncio.gather(*tasks)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def measure(rt: Runtime, registry: Registry, name: str, requests, rate, clients, seed, max_rows) -> dict:
    worker = WORKERS[name](rt, max_rows=max_rows, max_queue=1024)
    engine = ChatEngine(rt, registry, ServiceSettings(adapters=registry.root, max_tokens=512), worker=worker)
    engine.adapters.warm()
    asyncio.run(drive(engine, requests[:2], None, 2, seed))  # warm-up, out of the timing
    steps0, rows0 = worker.stats.steps, worker.stats.step_rows
    t0 = time.perf_counter()
    records = asyncio.run(drive(engine, requests, rate, clients, seed))
    wall = time.perf_counter() - t0
    engine.close()
    gaps = [g for r in records for g in r["gaps"]]
    ttft = [r["ttft"] for r in records]
    steps = max(1, worker.stats.steps - steps0)
    return {"tps": sum(r["tokens"] for r in records) / wall, "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99),
            "itl50": pct(gaps, 0.5), "itl99": pct(gaps, 0.99), "rows": (worker.stats.step_rows - rows0) / steps,
            "wall": wall}


# ---------------------------------------------------------------------------------------------------- invariance
async def mix_outputs(worker: Scheduler, reqs: list[GenerationRequest], offsets: list[float]) -> list[list[int]]:
    async def one(req, delay):
        await asyncio.sleep(delay)
        return [t.id async for t in worker.submit(req).tokens()]

    return await asyncio.gather(*(one(r, d) for r, d in zip(reqs, offsets)))


def invariance(rt: Runtime, registry: Registry, mixes: int, seed: int, max_rows: int) -> tuple[int, int]:
    """(answers that differ from their solo decode, answers compared) over ``mixes`` random mixes."""
    rnd = random.Random(seed)
    prompts = {r: registry.load(r).prompt for r in REGIONS}
    worker = Scheduler(rt, max_rows=max_rows, max_queue=1024)
    solo_cache: dict[tuple, list[int]] = {}
    differ = compared = 0
    try:
        for _ in range(mixes):
            k = rnd.randint(2, max_rows)
            reqs, offsets = [], []
            for _ in range(k):
                region = rnd.choice([*REGIONS, None])
                q = rnd.choice(QUESTIONS)
                reqs.append(GenerationRequest(rt.chat_ids([{"role": "user", "content": q}]),
                                              prompts[region] if region else None, rnd.randint(4, 24)))
                offsets.append(rnd.choice([0.0, 0.0, rnd.uniform(0, 0.3)]))  # some join mid-way
            outs = asyncio.run(mix_outputs(worker, reqs, offsets))
            for req, out, region_q in zip(reqs, outs, [(id(r.soft_prompt), tuple(r.input_ids), r.max_new_tokens)
                                                      for r in reqs]):
                if region_q not in solo_cache:
                    solo_cache[region_q] = asyncio.run(mix_outputs(worker, [req], [0.0]))[0]
                differ += out != solo_cache[region_q]
                compared += 1
    finally:
        worker.close()
    return differ, compared


def invariance_cost(args) -> None:
    """What batch-invariant decoding costs: the same closed-loop workload, row-wise vs batched attention."""
    reqs = workload(args.requests, args.seed, args.min_tokens, args.max_tokens)
    out = {}
    for invariant in (True, False):
        rt = load_runtime(dtype="bfloat16", batch_invariant=invariant)
        torch.set_num_threads(COMPUTE_THREADS)
        with tempfile.TemporaryDirectory(prefix="culign-bench-") as scratch:
            out[invariant] = r = measure(rt, registry_for(rt, scratch, 8), "continuous", reqs, None, args.clients,
                                         args.seed, args.max_rows)
        print(f"bf16, row-wise attention {'on ' if invariant else 'off'}: {r['tps']:.1f} tok/s, ITL p50 "
              f"{1000 * r['itl50']:.0f} ms, rows/step {r['rows']:.1f}", flush=True)
    print(f"CPU: {cpu_capability()}; batch-invariant decoding costs {100 * (1 - out[True]['tps'] / out[False]['tps']):+.1f} % "
          f"throughput (closed loop, {args.clients} clients)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2", help="open-loop arrival rates, requests per second")
    ap.add_argument("--requests", type=int, default=32, help="requests per workload")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--schedulers", default="continuous,static,one-adapter")
    ap.add_argument("--mixes", type=int, default=64, help="random request mixes for the invariance check (0: skip)")
    ap.add_argument("--dtype", default=None, help="load-test dtype (default: the service's, from the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invariance-cost", action="store_true",
                    help="only: closed-loop throughput in bf16 with row-wise decode attention (the default) and with "
                         "batched attention (CULIGN_BATCH_INVARIANT=0), in one run")
    args = ap.parse_args()
    if args.invariance_cost:
        return invariance_cost(args)

    rt = load_runtime(dtype=args.dtype)  # as the service does
    torch.set_num_threads(COMPUTE_THREADS)
    print(f"CPU: {cpu_capability()}; {rt.name} in {str(rt.dtype).removeprefix('torch.')}; {args.requests} requests "
          f"per workload, max_tokens {args.min_tokens}..{args.max_tokens}, 4 regions + base, in-process (no HTTP)")
    with tempfile.TemporaryDirectory(prefix="culign-bench-") as scratch:
        registry = registry_for(rt, scratch, 8)
        reqs = workload(args.requests, args.seed, args.min_tokens, args.max_tokens)
        loads = [(f"poisson@{r}", float(r)) for r in args.rates.split(",") if r] + [(f"closed-{args.clients}", None)]
        names = args.schedulers.split(",")
        print(f"\n{'workload':<12} {'scheduler':<12} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8} {'rows/step':>9}")
        for label, rate in loads:
            res = {}
            for name in names:
                res[name] = r = measure(rt, registry, name, reqs, rate, args.clients, args.seed, args.max_rows)
                print(f"{label:<12} {name:<12} {r['tps']:>7.1f} {r['ttft50']:>8.2f}s {r['ttft99']:>8.2f}s "
                      f"{1000 * r['itl50']:>6.0f}ms {1000 * r['itl99']:>6.0f}ms {r['rows']:>9.1f}", flush=True)
            c, s, o = res.get("continuous"), res.get("static"), res.get("one-adapter")
            if c and s:
                print(f"{'':<12} continuous vs static: TTFT p99 {100 * c['ttft99'] / s['ttft99']:.0f} % (goal <= 25 %), "
                      f"throughput {c['tps'] / s['tps']:.2f}x (goal >= 1)" +
                      (f"; vs one-adapter {c['tps'] / o['tps']:.2f}x (goal >= 3x)" if o else ""), flush=True)
        if args.mixes:
            for dtype in ("float32", "bfloat16"):
                rt_d = rt if str(rt.dtype).endswith(dtype) else load_runtime(dtype=dtype)
                torch.set_num_threads(COMPUTE_THREADS)
                reg_d = registry_for(rt_d, tempfile.mkdtemp(prefix="culign-bench-"), 8)
                differ, compared = invariance(rt_d, reg_d, args.mixes, args.seed, min(8, args.max_rows))
                print(f"batch invariance ({dtype}): {differ} of {compared} greedy answers differ from their solo "
                      f"decode over {args.mixes} random mixes (goal 0)", flush=True)


if __name__ == "__main__":
    main()
