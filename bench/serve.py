"""Serving benchmark under realistic load: continuous batching vs static micro-batching vs one adapter at a time.

Drives the service's own engine in-process (culign.serving.ChatService: validation, adapter cache, scheduler,
detokenizing), with no HTTP in the way. Requests ask for 8..256 new tokens (uniform, fixed seed) and spread over
4 regions plus the base model. Workloads:

  poisson@R    open loop: requests arrive at R per second (exponential gaps), whatever the server's state
  closed-16    16 clients, each sending its next request when the last one is answered

Engines (--engine culign,vllm) and, for culign's, schedulers (--schedulers):

  continuous   culign's engine as shipped (culign.serving.engines.scheduler.Scheduler): rows join at the next step, leave at once
  static       the previous design (StaticBatcher): gather for 5 ms, decode that batch to its end
  one-adapter  the peer: static batches that only ever hold one soft prompt (as PEFT serves a PromptTuning model)
  vllm-CFG     vLLM behind the same seam (culign.serving.engines.vllm), one engine per --vllm-configs entry: fp32-eager,
               bf16-eager, bf16-compiled (torch.compile; loads in ~100 s); soft prompts as prompt_embeds

Printed per (workload, engine): tokens/s, time to first token p50/p99, inter-token latency p50/p99, mean rows
per decode step (culign's engine), then per engine its start time and the RSS of the process and its children.
Goals (issue 9): TTFT p99 <= 25 % of static's at the same load, throughput >= static's, >= 3x the one-adapter peer.
Then batch invariance: random mixes of requests (regions, lengths, arrival offsets) through the continuous scheduler
(float32 and bf16) and through each vLLM engine, each greedy answer compared with the same request decoded alone.

    python bench/serve.py                          # culign's engine, everything (~10 min on 2 cores)
    python bench/serve.py --engine culign,vllm --schedulers continuous --rates 0.5,2   # the side-by-side table
    python bench/serve.py --rates 1 --requests 16 --mixes 16   # a quick look

Timings are only worth reading on a machine nobody else is using: vLLM keeps one core for its scheduler, and
another process on a 2-core box slows a decode step several-fold from one second to the next.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from culign.model import GenerationRequest, Runtime, cpu_bf16_native, cpu_capability  # noqa: E402
from culign.registry import Registry  # noqa: E402
from culign.serving import ChatRequest, ChatService, ServiceSettings  # noqa: E402
from culign.serving.engines import Job  # noqa: E402
from culign.serving.engines.scheduler import COMPUTE_THREADS, Scheduler, StaticBatcher  # noqa: E402


def load_runtime(**kwargs) -> Runtime:
    """The model as the service loads it: on one thread (culign.serving.engines.load_runtime says why)."""
    torch.set_num_threads(1)
    return Runtime.load(**kwargs)

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
VLLM_CONFIGS = {"fp32-eager": (torch.float32, True), "fp32-compiled": (torch.float32, False),
                "bf16-eager": (torch.bfloat16, True), "bf16-compiled": (torch.bfloat16, False)}


class Loop:
    """One event loop in a thread for a whole engine's run: vLLM's AsyncLLM binds to the loop of its first request,
    so every workload runs on this one (``run(coro)``); culign's scheduler works the same way on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def rss_mb() -> float:
    """This process and its children (vLLM's engine core and worker), MB."""
    import psutil

    me = psutil.Process(os.getpid())
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return total


def start_vllm(rt32: Runtime, config: str, max_rows: int, loop: Loop):
    """A vLLM engine for ``config`` (created on ``loop``) and its start time in seconds."""
    from culign.model import model_source
    from culign.serving.engines.vllm import VllmEngine

    dtype, eager = VLLM_CONFIGS[config]

    async def make():
        return VllmEngine(rt32, model_source()[0], max_rows=max_rows, max_queue=1024, dtype=dtype,
                          enforce_eager=eager, kv_cache_gib=2.0)
    t0 = time.perf_counter()
    engine = loop.run(make())
    return engine, time.perf_counter() - t0


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


async def one_request(engine: ChatService, region, question, max_tokens, out: list[dict]) -> None:
    body = ChatRequest(messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    prepared = await engine.prepare(body, [region] if region else [])
    job = engine.engine.submit(prepared.request, prepared.served_by, prepared.region)
    stamps = []
    async for _ in job.tokens():
        stamps.append(time.perf_counter())
    out.append({"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                "tokens": len(stamps)})


async def drive(engine: ChatService, requests, rate: float | None, clients: int, seed: int) -> list[dict]:
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


def measure(rt: Runtime, registry: Registry, name: str, requests, rate, clients, seed, max_rows,
            worker=None, run=asyncio.run) -> dict:
    """One workload through one engine: a culign scheduler made here (``name``), or a running ``worker`` (vLLM,
    whose coroutines go through ``run``: its loop), left running."""
    own = worker is None
    worker = worker or WORKERS[name](rt, max_rows=max_rows, max_queue=1024)
    engine = ChatService(rt, registry, ServiceSettings(adapters=registry.root, max_tokens=512), engine=worker)
    engine.adapters.warm()
    run(drive(engine, requests[:2], None, 2, seed))  # warm-up, out of the timing
    steps0, rows0 = worker.stats.steps, worker.stats.step_rows
    t0 = time.perf_counter()
    records = run(drive(engine, requests, rate, clients, seed))
    wall = time.perf_counter() - t0
    if own:
        engine.close()
    gaps = [g for r in records for g in r["gaps"]]
    ttft = [r["ttft"] for r in records]
    steps = max(1, worker.stats.steps - steps0)
    return {"tps": sum(r["tokens"] for r in records) / wall, "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99),
            "itl50": pct(gaps, 0.5), "itl99": pct(gaps, 0.99), "rows": (worker.stats.step_rows - rows0) / steps,
            "wall": wall}


# ---------------------------------------------------------------------------------------------------- invariance
async def mix_outputs(worker, reqs: list[GenerationRequest], offsets: list[float]) -> list[list[int]]:
    async def one(req, delay):
        await asyncio.sleep(delay)
        return [t.id async for t in worker.submit(req).tokens()]

    return await asyncio.gather(*(one(r, d) for r, d in zip(reqs, offsets)))


def invariance(rt: Runtime, registry: Registry, mixes: int, seed: int, max_rows: int, worker=None,
               run=asyncio.run) -> tuple[int, int]:
    """(answers that differ from their solo decode, answers compared) over ``mixes`` random mixes, through culign's
    continuous scheduler or a running ``worker`` (vLLM: its coroutines through ``run``, and left running)."""
    rnd = random.Random(seed)
    prompts = {r: registry.load(r).prompt for r in REGIONS}
    own = worker is None
    worker = worker or Scheduler(rt, max_rows=max_rows, max_queue=1024)
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
            outs = run(mix_outputs(worker, reqs, offsets))
            for req, out, region_q in zip(reqs, outs, [(id(r.soft_prompt), tuple(r.input_ids), r.max_new_tokens)
                                                      for r in reqs]):
                if region_q not in solo_cache:
                    solo_cache[region_q] = run(mix_outputs(worker, [req], [0.0]))[0]
                differ += out != solo_cache[region_q]
                compared += 1
    finally:
        if own:
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
    ap.add_argument("--schedulers", default="continuous,static,one-adapter", help="culign's engine: which schedulers")
    ap.add_argument("--engine", default="culign", help="culign, vllm or both (culign,vllm)")
    ap.add_argument("--vllm-configs", default="fp32-eager,bf16-eager,bf16-compiled",
                    help=f"vLLM engines to measure: {', '.join(VLLM_CONFIGS)}")
    ap.add_argument("--mixes", type=int, default=64, help="random request mixes for the invariance check (0: skip)")
    ap.add_argument("--dtype", default=None, help="load-test dtype (default: the service's, from the CPU)")
    ap.add_argument("--invariance-dtypes", default="auto",
                    help="culign's engine: dtypes of the invariance check, e.g. float32,bfloat16 (auto: float32, and "
                         "bfloat16 only where the CPU multiplies it natively; emulated bf16 is ~65x slower)")
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
        engines = [e.strip() for e in args.engine.split(",") if e.strip()]
        names = args.schedulers.split(",") if "culign" in engines else []
        print(f"\n{'workload':<12} {'engine':<18} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8} {'rows/step':>9}")

        def row(label, name, r):
            rows = f"{r['rows']:>9.1f}" if name in WORKERS else f"{'-':>9}"
            print(f"{label:<12} {name:<18} {r['tps']:>7.1f} {r['ttft50']:>8.2f}s {r['ttft99']:>8.2f}s "
                  f"{1000 * r['itl50']:>6.0f}ms {1000 * r['itl99']:>6.0f}ms {rows}", flush=True)

        res: dict[str, dict] = {}
        for label, rate in loads:
            res[label] = {}
            for name in names:
                res[label][name] = r = measure(rt, registry, name, reqs, rate, args.clients, args.seed,
                                               args.max_rows)
                row(label, name, r)
            c, s, o = (res[label].get(k) for k in ("continuous", "static", "one-adapter"))
            if c and s:
                print(f"{'':<12} continuous vs static: TTFT p99 {100 * c['ttft99'] / s['ttft99']:.0f} % (goal <= 25 %), "
                      f"throughput {c['tps'] / s['tps']:.2f}x (goal >= 1)" +
                      (f"; vs one-adapter {c['tps'] / o['tps']:.2f}x (goal >= 3x)" if o else ""), flush=True)
        starts = {}
        if names:
            starts["culign"] = f"culign engine: RSS {rss_mb():.0f} MB (this process)"
        vllm_agreement = {}
        if "vllm" in engines:
            rt32 = rt if rt.dtype == torch.float32 else load_runtime(dtype="float32")  # embeddings for vLLM
            for config in [c for c in args.vllm_configs.split(",") if c]:
                loop = Loop()
                vllm, started = start_vllm(rt32, config, args.max_rows, loop)
                name = f"vllm-{config}"
                for label, rate in loads:
                    res[label][name] = r = measure(rt32, registry, name, reqs, rate, args.clients, args.seed,
                                                   args.max_rows, worker=vllm, run=loop.run)
                    row(label, name, r)
                starts[name] = f"{name}: start {started:.1f} s, RSS {rss_mb():.0f} MB (process + engine core)"
                if args.mixes:
                    vllm_agreement[name] = invariance(rt32, registry, args.mixes, args.seed, min(8, args.max_rows),
                                                      worker=vllm, run=loop.run)
                vllm.close()
                loop.close()
        for line in starts.values():
            print(line, flush=True)
        for label in res:
            c = res[label].get("continuous")
            for name, r in res[label].items():
                if c and name.startswith("vllm"):
                    print(f"{label:<12} {name} vs culign's continuous: throughput {r['tps'] / c['tps']:.2f}x, "
                          f"TTFT p99 {r['ttft99'] / c['ttft99']:.2f}x", flush=True)
        for name, (differ, compared) in vllm_agreement.items():
            print(f"batch invariance ({name}): {differ} of {compared} greedy answers differ from their solo decode "
                  f"over {args.mixes} random mixes", flush=True)
        if args.mixes and names:
            dtypes = args.invariance_dtypes.split(",")
            if args.invariance_dtypes == "auto":
                dtypes = ["float32"] + (["bfloat16"] if cpu_bf16_native() else [])
                if not cpu_bf16_native():
                    print(f"batch invariance (bfloat16): not measured, this CPU ({cpu_capability()}) emulates bf16 "
                          "(--invariance-dtypes float32,bfloat16 to force it)", flush=True)
            for dtype in dtypes:
                rt_d = rt if str(rt.dtype).endswith(dtype) else load_runtime(dtype=dtype)
                torch.set_num_threads(COMPUTE_THREADS)
                reg_d = registry_for(rt_d, tempfile.mkdtemp(prefix="culign-bench-"), 8)
                differ, compared = invariance(rt_d, reg_d, args.mixes, args.seed, min(8, args.max_rows))
                print(f"batch invariance ({dtype}): {differ} of {compared} greedy answers differ from their solo "
                      f"decode over {args.mixes} random mixes (goal 0)", flush=True)


if __name__ == "__main__":
    main()
