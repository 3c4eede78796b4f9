"""When the inference engine dies, the service comes back by itself (issue: engine faults).

In-process on the tiny random Llama: the supervisor restarts a dead decode thread, its in-flight requests end with
an error (never a hang), counters carry over, and a start that keeps failing gives up. Then on live servers
(`bentoml serve` on 127.0.0.1, real HTTP): culign's decode thread made to raise (a test hook), and vLLM's engine
process SIGKILLed as the OOM killer would, each three times in a row with requests in flight, streamed and not.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from culign.model import GenerationRequest
from culign.serving.engines import RowFailed, ShuttingDown, Supervisor
from culign.serving.engines.scheduler import FAULT_FILE_ENV, START_FAULT_FILE_ENV, Scheduler
from reliability.harness import REPO, copy_registry, record, serve

LONG = {"messages": [{"role": "user", "content": "Tell me a very long story about a ship."}], "max_tokens": 400}
HANG_S = 30  # far past any grace: a request still open this long after the death has hung


def _long_request(rt) -> GenerationRequest:
    return GenerationRequest(rt.chat_ids([{"role": "user", "content": "tell me a long story"}]), None, 4000)


async def _kill_mid_answer(sup, rt, fault) -> float:
    """A long request decoding, then the decode thread made to raise: its answer must end in RowFailed (not hang);
    returns how long that took."""
    job = sup.submit(_long_request(rt))
    tokens = job.tokens()
    await tokens.__anext__()  # decoding
    fault.touch()
    t0 = time.monotonic()
    with pytest.raises(RowFailed, match="decode thread stopped"):
        async for _ in tokens:
            pass
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------------- in-process
def test_a_dead_decode_thread_is_restarted_and_its_requests_fail_fast(tiny_runtime, tmp_path, monkeypatch):
    fault = tmp_path / "fault"
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    sup = Supervisor(lambda: Scheduler(tiny_runtime, 4, 4, threads=1), poll_s=0.05)
    threads_before = threading.active_count()

    async def one_death():
        first = sup.engine
        failed_after = await _kill_mid_answer(sup, tiny_runtime, fault)
        assert not first.alive() and first.death and "InjectedFault" in first.death
        with pytest.raises((RowFailed, ShuttingDown)):  # the dead engine, or the supervisor while it restarts
            first.submit(_long_request(tiny_runtime))
        deadline = time.monotonic() + 10
        while not sup.alive():
            assert time.monotonic() < deadline, "the engine did not come back"
            await asyncio.sleep(0.02)
        assert sup.engine is not first
        answer = [t.id async for t in sup.submit(GenerationRequest([5, 6, 7], None, 3)).tokens()]
        return failed_after, answer

    try:
        for kill in range(1, 4):  # three in a row: each comes back, and nothing piles up
            failed_after, answer = asyncio.run(one_death())
            assert failed_after < HANG_S and len(answer) == 3  # ended, not hung
            assert sup.restarts == kill and sup.stats.failed_rows == 0  # a death is not a row's sampling failure
            assert sup.last_recovery_s is not None
        assert threading.active_count() <= threads_before  # each dead engine's thread is gone, one live one
        assert sup.stats.requests_by_region["base"] == 6  # counted since start, across the three engines
    finally:
        sup.close()


def test_the_supervisor_gives_up_after_failed_restarts(tiny_runtime, tmp_path, monkeypatch):
    fault = tmp_path / "fault"
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    starts, reasons = [], []

    def start():
        starts.append(time.monotonic())
        if len(starts) > 1:
            raise RuntimeError("out of memory (simulated)")
        return Scheduler(tiny_runtime, 2, 2, threads=1)

    sup = Supervisor(start, max_failures=2, poll_s=0.05, backoff_s=0.05, on_give_up=reasons.append)

    asyncio.run(_kill_mid_answer(sup, tiny_runtime, fault))
    deadline = time.monotonic() + 10
    while not sup.gave_up:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(starts) == 3 and not sup.live() and not sup.alive()
    assert reasons and "2 restarts in a row failed" in reasons[0]
    with pytest.raises(ShuttingDown):
        asyncio.run(_submit(sup, tiny_runtime))
    sup.close()


def test_a_shutdown_that_looks_like_a_death_starts_nothing(tiny_runtime, tmp_path, monkeypatch):
    """SIGTERM reaches vLLM's engine process as it reaches the worker, so the engine can die just before the service
    closes: the supervisor must not start an engine that nobody would ever close (an orphaned process)."""
    fault = tmp_path / "fault"
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    starts = []

    def start():
        starts.append(Scheduler(tiny_runtime, 2, 2, threads=1))
        return starts[-1]

    sup = Supervisor(start, poll_s=0.05)

    async def die_then_close():
        await _kill_mid_answer(sup, tiny_runtime, fault)
        sup.close()  # the service's own SIGTERM handler, a moment after the engine died

    asyncio.run(die_then_close())
    time.sleep(1.0)  # longer than the supervisor waits before restarting
    assert len(starts) == 1 and sup.restarts == 0 and not any(s.alive() for s in starts)


async def _submit(sup, rt):
    return sup.submit(GenerationRequest([5, 6], None, 2))


# ---------------------------------------------------------------------------------------------------- live servers
def _in_flight(url: str, n_plain: int, n_streams: int) -> tuple[list, list[threading.Thread]]:
    """Requests started in threads: each result is (kind, status, last event or body, seconds)."""
    results: list = []

    def plain():
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=120)
            results.append(("plain", r.status_code, r.text[-300:], time.monotonic() - t0))
        except httpx.HTTPError as e:
            results.append(("plain", type(e).__name__, "", time.monotonic() - t0))

    def stream():
        t0 = time.monotonic()
        lines = []
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True},
                              timeout=120) as r:
                lines = [line for line in r.iter_lines() if line]
                results.append(("stream", r.status_code, lines[-1] if lines else "", time.monotonic() - t0))
        except httpx.HTTPError as e:
            results.append(("stream", type(e).__name__, lines[-1] if lines else "", time.monotonic() - t0))

    threads = [threading.Thread(target=plain) for _ in range(n_plain)]
    threads += [threading.Thread(target=stream) for _ in range(n_streams)]
    for t in threads:
        t.start()
    return results, threads


def _ended_cleanly(kind, status, last, _seconds) -> bool:
    """A request cut by the death: a 503 (or a 200 that completed before it), or a stream whose last event is an
    error - never a [DONE] after a cut, never a hang."""
    if kind == "plain":
        return status == 503 or (status == 200 and '"finish_reason"' in last)
    if status != 200:
        return status == 503
    return last == "data: [DONE]" or (last.startswith("data: {") and '"error"' in last and "503" in last)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _engine_processes(server) -> list:
    import psutil

    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or any("EngineCore" in part for part in p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _zombies(server) -> list:
    import psutil

    return [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)
            if p.status() == psutil.STATUS_ZOMBIE]


def _kill_three_times(server, engine: str, kill) -> list[dict]:
    rows = []
    rss0 = server.rss_mb()["worker"]
    for n in range(1, 4):
        results, threads = _in_flight(server.url, 2, 2)
        time.sleep(1.5 if engine == "culign" else 3.0)  # every request admitted and decoding
        t0 = time.monotonic()
        kill()
        ready_503 = False
        for t in threads:
            t.join(HANG_S)
        assert not any(t.is_alive() for t in threads), "an in-flight request hung after the engine died"
        ended_s = time.monotonic() - t0
        deadline = time.monotonic() + 300
        while True:  # /readyz: 503 while it recovers, then 200
            status = httpx.get(f"{server.url}/readyz", timeout=10).status_code
            ready_503 |= status == 503
            if status == 200 and _metric(server.url, "culign_engine_restarts_total") >= n:
                break
            assert time.monotonic() < deadline, f"not ready 300 s after kill {n}:\n{server.log()[-3000:]}"
            time.sleep(0.05)
        first_200 = None
        while first_200 is None:
            r = server.normal(timeout=120)
            if r.status_code == 200:
                first_200 = time.monotonic() - t0
            else:
                assert r.status_code == 503, r.text
                time.sleep(0.2)
        bad = [r for r in results if not _ended_cleanly(*r)]
        assert len(results) == 4 and not bad, bad
        assert any(r[1] == 503 or "error" in r[2] for r in results), results  # the kill did cut requests short
        rows.append({"kill": n, "in_flight_ended_s": round(ended_s, 1), "first_200_s": round(first_200, 1),
                     "readyz_503_seen": ready_503, "statuses": sorted(str(r[1]) for r in results),
                     "recovery_s": _metric(server.url, "culign_engine_last_recovery_seconds"),
                     "zombies": len(_zombies(server)), "rss_worker_mb": round(server.rss_mb()["worker"])})
    assert rows[-1]["zombies"] == 0
    assert rows[-1]["rss_worker_mb"] - rss0 < 400, rows  # three engines later, the worker has not kept the dead
    assert "died" in server.log() and "is back after" in server.log()  # the log says why and when
    return rows


@pytest.mark.reliability_quick
@pytest.mark.reliability
def test_culign_decode_thread_dies_three_times_and_the_service_comes_back(tmp_path):
    fault = tmp_path / "decode-fault"
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_DTYPE="float32",
               CULIGN_MAX_TOKENS=400, **{FAULT_FILE_ENV: str(fault)}) as server:
        rows = _kill_three_times(server, "culign", fault.touch)
    record("engine-death", engine="culign", rows=rows)


@pytest.mark.reliability_quick
@pytest.mark.reliability
def test_when_restarts_keep_failing_the_worker_exits_and_is_replaced(tmp_path):
    """The engine dies and every restart fails (the start hook): /livez turns 503, the worker exits non-zero for its
    supervisor (here BentoML's arbiter) to start a new one, which serves once starting works again."""
    import psutil

    fault, start_fault = tmp_path / "decode-fault", tmp_path / "start-fault"
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_DTYPE="float32",
               CULIGN_MAX_TOKENS=400, CULIGN_ENGINE_RESTART_ATTEMPTS=2,
               **{FAULT_FILE_ENV: str(fault), START_FAULT_FILE_ENV: str(start_fault)}) as server:
        worker = max(psutil.Process(server.proc.pid).children(recursive=True), key=lambda p: p.memory_info().rss)
        results, threads = _in_flight(server.url, 1, 1)
        time.sleep(1.5)
        start_fault.touch()  # from now on no engine starts
        fault.touch()  # and the running one dies
        for t in threads:
            t.join(HANG_S)
        assert not any(t.is_alive() for t in threads) and all(_ended_cleanly(*r) for r in results), results
        livez_503, deadline = False, time.monotonic() + 60
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
            try:
                livez_503 |= httpx.get(f"{server.url}/livez", timeout=5).status_code == 503
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not exit after its restarts failed"
            time.sleep(0.1)
        assert livez_503
        log = server.log()
        assert "restart 1 of 2 failed" in log and "exiting the worker (status 70)" in log
        start_fault.unlink()  # starting works again: the arbiter's new worker comes up and serves
        deadline = time.monotonic() + 120
        while True:
            try:
                if server.normal(timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no new worker served:\n{server.log()[-3000:]}"
            time.sleep(0.5)


@pytest.mark.reliability
def test_vllm_engine_process_killed_three_times_and_the_service_comes_back(tmp_path):
    from conftest import need_vllm

    need_vllm()
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_DTYPE="float32",
               CULIGN_MAX_TOKENS=400, CULIGN_ENGINE="vllm") as server:
        t_start = time.monotonic()
        assert len(_engine_processes(server)) == 1
        cold_start_s = _cold_start(server) or (time.monotonic() - t_start)

        def kill():
            [proc] = _engine_processes(server)
            os.kill(proc.pid, signal.SIGKILL)

        rows = _kill_three_times(server, "vllm", kill)
        assert all(r["readyz_503_seen"] for r in rows), rows
        assert len(_engine_processes(server)) == 1  # exactly the live one: every dead one was reaped
    # the goal (kill to first 200 within 2x the engine's cold start) is measured and reported, not asserted
    record("engine-death", engine="vllm", rows=rows, cold_start_s=cold_start_s)


def _cold_start(server) -> float | None:
    """The vLLM engine's start-up as the service logged it ("vLLM engine up in 21.3 s")."""
    import re

    m = re.search(r"vLLM engine up in ([0-9.]+) s", server.log())
    return float(m.group(1)) if m else None


_WORKER = """
import subprocess, sys, time
from culign.serving.engines.reaper import start_reaper
start_reaper()
engine = subprocess.Popen(["sleep", "600"])  # stands in for vLLM's engine process: a child that never looks up
print(engine.pid, flush=True)
time.sleep(600)
"""


def test_what_a_killed_worker_leaves_behind_is_reaped(tmp_path):
    """A worker SIGKILLed (as the OOM killer would) while its engine process runs: the reaper it started kills the
    engine process, which would otherwise run on forever re-parented to init."""
    import psutil

    worker = subprocess.Popen([sys.executable, "-c", _WORKER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        engine = psutil.Process(int(worker.stdout.readline()))
        time.sleep(1.5)  # the reaper polls every 0.5 s: it has seen the engine process
        worker.send_signal(signal.SIGKILL)  # the worker dies without closing anything
        worker.wait(10)
        engine.wait(10)  # raises TimeoutExpired if nothing killed it
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
