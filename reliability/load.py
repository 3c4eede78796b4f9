"""Load and client disconnects against a live server, with plain threads and httpx (bounded: one request in flight
per client)."""
from __future__ import annotations

import random
import statistics
import threading
import time

import httpx

QUESTIONS = ["What matters most in raising children?", "Should employees question their manager's decisions?",
             "Is it better to save money or to enjoy life now?", "How should a leader treat mistakes?"]
REGIONS = ["US", "CN", "IN", "SA", None]  # None: the base model, no adapter


def _request(client: httpx.Client, url: str, rng: random.Random, stream: bool, region: str | None,
             max_tokens: int) -> tuple[int | str, float, float | None]:
    """(status or error name, seconds to the end, seconds to the first chunk for streams)."""
    msgs = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    t0 = time.monotonic()
    if not stream:
        r = client.post(f"{url}/chat", json={"messages": msgs, "max_tokens": max_tokens},
                        headers={"X-Culign-Region": region} if region else {})
        return r.status_code, time.monotonic() - t0, None
    body = {"messages": msgs, "max_tokens": max_tokens, "stream": True, **({"model": region} if region else {})}
    first = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data:"):
                first = time.monotonic() - t0
            if line.strip() == "data: [DONE]":
                break
            if '"error"' in line and r.status_code == 200:
                return "in-stream error", time.monotonic() - t0, first
        return r.status_code, time.monotonic() - t0, first


def run_load(url: str, clients: int = 16, seconds: float = 60.0, seed: int = 0, timeout: float = 120.0) -> dict:
    results: list[tuple] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=timeout) as c:
            n = 0
            while time.monotonic() < stop_at:
                stream = (i + n) % 2 == 1  # half the requests stream
                region = REGIONS[(i + n) % len(REGIONS)]
                max_tokens = rng.randint(8, 32)
                try:
                    status, secs, first = _request(c, url, rng, stream, region, max_tokens)
                except httpx.HTTPError as e:
                    status, secs, first = type(e).__name__, timeout, None
                with lock:
                    results.append((status, secs, first, stream, region or "base", max_tokens))
                n += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    wall = time.monotonic() - t0
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    ttft = sorted(r[2] for r in ok if r[2] is not None)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(results), "ok": len(ok),
            "statuses": statuses, "errors": sum(1 for r in results if r[0] not in (200, 429)),
            "rejected_429": statuses.get("429", 0), "rps": round(len(results) / wall, 2),
            "p50_s": round(_pct(lat, 50), 2), "p99_s": round(_pct(lat, 99), 2),
            "ttft_p50_s": round(_pct(ttft, 50), 2), "ttft_p99_s": round(_pct(ttft, 99), 2)}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def solo(url: str, max_tokens: int = 32, n: int = 3) -> float:
    """Median seconds of a lone non-streaming request of ``max_tokens`` tokens (greedy, the US adapter)."""
    times = []
    with httpx.Client(timeout=120) as c:
        for _ in range(n):
            t0 = time.monotonic()
            r = c.post(f"{url}/chat", json={"messages": [{"role": "user", "content": QUESTIONS[0]}],
                                            "max_tokens": max_tokens}, headers={"X-Culign-Region": "US"})
            r.raise_for_status()
            times.append(time.monotonic() - t0)
    return statistics.median(times)


def disconnect_streams(url: str, n: int = 20, max_tokens: int = 32) -> dict:
    """Open ``n`` streams at once, read the first chunk of each, close them all; count those that did stream."""
    got_first = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        body = {"model": ["US", "CN", "IN", "SA"][i % 4], "stream": True, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got_first.append(r.status_code)
                        break
            # leaving the block closes the connection mid-stream

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return {"streams": n, "first_chunks": len(got_first), "seconds": round(time.monotonic() - t0, 2)}


def gauges(url: str) -> dict[str, float]:
    """culign's gauges from /metrics: rows in flight, queue depth, rows cancelled so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("culign_rows_in_flight", "culign_queue_depth", "culign_cancelled_rows_total"):
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        out[name] = sum(values) if values else float("nan")
    return out


def drain_seconds(url: str, limit: float = 120.0) -> float:
    """Seconds until no row is in flight and nothing waits (polled every 0.1 s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        g = gauges(url)
        if g["culign_rows_in_flight"] == 0 and g["culign_queue_depth"] == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    return float("inf")
