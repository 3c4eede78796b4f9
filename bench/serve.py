"""Serving benchmark: mixed-region batching vs one adapter per batch (PEFT-style) vs the base model.

Drives the service's own engine in-process (culign.serving.ChatEngine: validation, adapter cache, the batching
decode worker, detokenizing), with no HTTP in the way, so it measures the batching itself. N concurrent clients,
spread over R regions, each send their requests one after another (closed loop):

  mixed        the service as shipped: rows of any region share a batch, one forward per step
  one-adapter  (a) the same requests, but a batch only ever holds one soft prompt (as PEFT serves a PromptTuning
               model); the regions waiting are decoded one after another
  base         (b) the same requests with no region header: the base model, no soft prompts

    python bench/serve.py                      # 8 clients, 4 regions, 2 requests each, 32 new tokens
    python bench/serve.py --check-solo         # also: does each batched greedy answer equal its solo decode?

Goals (issue): mixed >= 3x one-adapter in tokens/s; soft-prompt overhead vs base <= 10 %.
Adapters: random prompts scaled like the embedding table (fixed seeds) in a temporary registry, unless --adapters
names a registry holding at least --regions regions.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from culign.registry import Registry  # noqa: E402
from culign.runtime import Runtime  # noqa: E402
from culign.serving import COMPUTE_THREADS, BatchWorker, ChatEngine, ChatRequest, Job, load_runtime  # noqa: E402

REGIONS = ["US", "CN", "IN", "SA", "JP", "DE", "BR", "NG"]
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


class OneAdapterPerBatch(BatchWorker):
    """PEFT-style serving: the rows of one batch share one soft prompt; other regions wait their turn."""

    def _decode(self, batch: list[Job]) -> None:
        groups: dict[str, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.label, []).append(job)
        for group in groups.values():
            super()._decode(group)


def registry_for(rt: Runtime, args, scratch: str) -> Registry:
    if args.adapters and len(Registry(args.adapters).regions()) >= args.regions:
        return Registry(args.adapters)
    registry, std = Registry(scratch), rt.embedding_matrix.float().std()
    for seed, region in enumerate(REGIONS[:args.regions]):
        g = torch.Generator().manual_seed(seed)
        registry.save(region, torch.randn(args.virtual_tokens, rt.hidden_size, generator=g) * std,
                      base_model=rt.name, base_fingerprint=rt.fingerprint, provenance={"bench": True})
    return registry


async def run_clients(engine: ChatEngine, clients: int, requests: int, max_tokens: int,
                      regions: list[str | None]) -> list[dict]:
    """Every client's requests, one after another; one record per request."""
    out: list[dict] = []

    async def client(c: int) -> None:
        for r in range(requests):
            region, question = regions[c % len(regions)], QUESTIONS[(c + r) % len(QUESTIONS)]
            body = ChatRequest(messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                               temperature=0.0)
            t0 = time.perf_counter()
            prepared = engine.prepare(body, [region] if region else [])
            result = await engine.generate(prepared)
            out.append({"latency": time.perf_counter() - t0, "ids": result.token_ids, "request": prepared.request})

    await asyncio.gather(*(client(c) for c in range(clients)))
    return out


def scenario(rt: Runtime, registry: Registry, args, worker_cls, regions: list[str | None]) -> dict:
    worker = worker_cls(rt, args.window_ms / 1000, args.clients)
    engine = ChatEngine(rt, registry, max_tokens_cap=args.max_tokens, worker=worker)
    engine.adapters.warm()
    asyncio.run(run_clients(engine, args.clients, 1, 2, regions))  # warm-up, out of the timing
    worker.batches = worker.rows = 0
    t0 = time.perf_counter()
    records = asyncio.run(run_clients(engine, args.clients, args.requests, args.max_tokens, regions))
    wall = time.perf_counter() - t0
    engine.close()
    latencies = sorted(r["latency"] for r in records)
    tokens = sum(len(r["ids"]) for r in records)
    return {"requests": len(records), "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "p50": statistics.median(latencies), "p99": percentile(latencies, 0.99),
            "rows": worker.rows / max(1, worker.batches), "records": records}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few requests, p99 is the slowest one)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, int(-(-q * len(sorted_values) // 1)) - 1))]


def solo_mismatches(rt: Runtime, records: list[dict]) -> list[int]:
    """For each batched answer that differs from the same request decoded alone: the first differing position."""
    firsts = []
    torch.set_num_threads(COMPUTE_THREADS)  # as the worker decoded; after the timed runs (see load_runtime)
    for rec in records:
        solo = rt.generate([rec["request"]])[0]
        if solo != rec["ids"]:
            firsts.append(next((i for i, (a, b) in enumerate(zip(solo, rec["ids"])) if a != b),
                               min(len(solo), len(rec["ids"]))))
    return firsts


def run(rt: Runtime, registry: Registry, args) -> None:
    regions = registry.regions()[:args.regions]
    print(f"{rt.name} on {rt.device} in {str(rt.dtype).removeprefix('torch.')}, torch threads "
          f"{COMPUTE_THREADS} (decode worker); {args.clients} clients over {len(regions)} regions ({', '.join(regions)}), "
          f"{args.requests} requests each, {args.max_tokens} new tokens max, in-process (no HTTP)")
    reports = {
        "mixed": scenario(rt, registry, args, BatchWorker, regions),
        "one-adapter": scenario(rt, registry, args, OneAdapterPerBatch, regions),
        "base": scenario(rt, registry, args, BatchWorker, [None]),
    }
    print(f"{'scenario':<12} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6} "
          f"{'rows/batch':>10}")
    for name, r in reports.items():
        print(f"{name:<12} {r['requests']:>8} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>7.1f} {r['p50']:>6.2f} "
              f"{r['p99']:>6.2f} {r['rows']:>10.1f}")
    mixed, one, base = reports["mixed"], reports["one-adapter"], reports["base"]
    print(f"mixed vs one-adapter: {mixed['tps'] / one['tps']:.2f}x tokens/s, p50 {one['p50'] / mixed['p50']:.2f}x "
          f"lower, p99 {one['p99'] / mixed['p99']:.2f}x lower   (goal >= 3x)")
    print(f"soft-prompt overhead vs base: {100 * (1 - mixed['tps'] / base['tps']):+.1f} % tokens/s, "
          f"p50 {100 * (mixed['p50'] / base['p50'] - 1):+.1f} %   (goal <= 10 %)")
    if args.check_solo:
        firsts = solo_mismatches(rt, mixed["records"])
        print(f"batched vs solo greedy ({str(rt.dtype).removeprefix('torch.')}): {len(firsts)} of "
              f"{len(mixed['records'])} answers differ" + (f" (first differing token at {sorted(firsts)})"
                                                            if firsts else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--regions", type=int, default=4, choices=range(1, len(REGIONS) + 1))
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--virtual-tokens", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=5.0, help="batch gathering window of the decode worker")
    ap.add_argument("--dtype", default=None, help="runtime dtype (default: CULIGN_DTYPE or the device's default)")
    ap.add_argument("--adapters", default=None, help="a registry with at least --regions regions to use instead")
    ap.add_argument("--check-solo", action="store_true",
                    help="also decode every mixed-batch request alone and count greedy answers that differ")
    args = ap.parse_args()

    rt = load_runtime(dtype=args.dtype)  # as the service does: see its docstring
    with tempfile.TemporaryDirectory(prefix="culign-bench-") as scratch:
        run(rt, registry_for(rt, args, scratch), args)


if __name__ == "__main__":
    main()
