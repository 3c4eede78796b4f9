"""Soak: a real server (`bentoml serve`, 127.0.0.1) under 8 clients for 30 minutes, mixed regions, streamed and not.

Counts every answer that is not a 200 (a stream must end with [DONE]), and samples the worker's RSS every 10 s; the
slope of RSS against time after the warm-up (least squares, MB per hour) says whether memory keeps growing.

    .venv/bin/python bench/soak.py                       # vLLM (the default engine), 8 clients, 30 minutes
    .venv/bin/python bench/soak.py --engine culign --minutes 5

A benchmark, not a test: run it on a quiet machine (the CPU is printed with the results). Bounded: it stops by
itself after --minutes, and talks only to the server it started on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from culign.model import cpu_capability  # noqa: E402
from reliability.harness import copy_registry, serve  # noqa: E402

REGIONS = ["US", "CN", "IN", "SA", None]
QUESTIONS = ["What matters most in a good job?", "How should children be raised?", "Describe a good boss.",
             "Is it important to save money?", "What do you do on a free evening?"]


def client(url: str, stop_at: float, seed: int, outcomes: Counter, latencies: list[float]) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=url, timeout=300) as c:
        while time.monotonic() < stop_at:
            region, stream = rnd.choice(REGIONS), rnd.random() < 0.5
            body = {"messages": [{"role": "user", "content": rnd.choice(QUESTIONS)}],
                    "max_tokens": rnd.randint(8, 64), "stream": stream}
            headers = {"X-Culign-Region": region} if region else {}
            t0 = time.monotonic()
            try:
                if stream:
                    with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                        lines = [line for line in r.iter_lines() if line]
                        ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                        outcomes["200 stream" if ok else f"{r.status_code} stream {lines[-1][:80] if lines else ''}"] += 1
                else:
                    r = c.post("/v1/chat/completions", json=body, headers=headers)
                    outcomes["200" if r.status_code == 200 else f"{r.status_code} {r.text[:80]}"] += 1
            except httpx.HTTPError as e:
                outcomes[type(e).__name__] += 1
            latencies.append(time.monotonic() - t0)


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    if n < 2:
        return float("nan")
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 3600 * sum((t - mt) * (r - mr) for t, r in samples) / var if var else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="vllm", choices=["vllm", "culign"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=5.0, help="RSS samples before this are left out")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="culign-soak-") as tmp:
        work = Path(tmp)
        with serve(work, copy_registry(work / "adapters", versions=(1,)), CULIGN_ENGINE=args.engine,
                   CULIGN_DTYPE="float32", CULIGN_MAX_TOKENS=64) as server:
            t0 = time.monotonic()
            stop_at = t0 + 60 * args.minutes
            outcomes: Counter = Counter()
            latencies: list[float] = []
            threads = [threading.Thread(target=client, args=(server.url, stop_at, i, outcomes, latencies))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            rss: list[tuple[float, float]] = []
            while any(t.is_alive() for t in threads):
                rss.append((time.monotonic() - t0, server.rss_mb()["worker"]))
                print(f"{rss[-1][0] / 60:5.1f} min  worker RSS {rss[-1][1]:7.0f} MB  answers {sum(outcomes.values())}",
                      flush=True)
                time.sleep(10)
            for t in threads:
                t.join()
            errors = {k: v for k, v in outcomes.items() if not k.startswith("200")}
            after = [(t, r) for t, r in rss if t >= 60 * args.warmup_minutes]
    lat = sorted(latencies)
    result = {"engine": args.engine, "clients": args.clients, "minutes": args.minutes, "cpu": cpu_capability(),
              "answers": sum(outcomes.values()), "errors": sum(errors.values()), "error_kinds": errors,
              "p50_s": round(lat[len(lat) // 2], 2) if lat else None,
              "p99_s": round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
              "rss_start_mb": round(rss[0][1]) if rss else None, "rss_end_mb": round(rss[-1][1]) if rss else None,
              "rss_slope_mb_per_hour_after_warmup": round(slope_mb_per_hour(after), 1),
              "warmup_minutes": args.warmup_minutes}
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
