"""The continuous-batching scheduler on the tiny random Llama: rows joining mid-way get their solo output, finished
and cancelled rows leave and free their cache, a failing row fails alone, the queue is bounded, close is prompt."""
import asyncio
import time

import pytest
import torch

from culign.runtime import GenerationRequest
from culign.scheduler import QueueFull, RowFailed, Scheduler, ShuttingDown, StaticBatcher


def _requests(rt, n, seed=0, max_new=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, len(rt.tokenizer), (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
        prompt = None if i % 3 == 0 else torch.randn(int(torch.randint(1, 6, (1,), generator=g)), rt.hidden_size,
                                                     generator=g)
        out.append(GenerationRequest(ids.tolist(), prompt, max_new_tokens=max_new - i % 4))
    return out


async def _collect(job):
    return [t.id async for t in job.tokens()]


def _solo(rt, requests):
    return [rt.generate([r])[0] for r in requests]


@pytest.fixture
def scheduler(tiny_runtime):
    s = Scheduler(tiny_runtime, max_rows=8, max_queue=8, threads=1)
    yield s
    s.close()


def test_rows_joining_at_any_step_get_their_solo_output(tiny_runtime, scheduler):
    reqs = _requests(tiny_runtime, 10)
    solo = _solo(tiny_runtime, reqs)

    async def staggered():
        jobs, tasks = [], []
        for i, r in enumerate(reqs):
            jobs.append(scheduler.submit(r, label=f"r{i}"))
            tasks.append(asyncio.ensure_future(_collect(jobs[-1])))
            # wait until the previous row has produced a few tokens, so this one joins a running batch mid-way
            while i and jobs[-2].produced < min(2 + i % 3, reqs[i - 1].max_new_tokens) and not jobs[-2].finished:
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    assert asyncio.run(staggered()) == solo
    assert scheduler.stats.prefills == len(reqs)
    assert scheduler.stats.step_rows / scheduler.stats.steps > 1  # rows really shared steps


def test_all_at_once_and_one_by_one_agree_with_the_static_batcher(tiny_runtime, scheduler):
    reqs = _requests(tiny_runtime, 6, seed=1)

    async def together(worker):
        return await asyncio.gather(*[_collect(worker.submit(r)) for r in reqs])

    static = StaticBatcher(tiny_runtime, max_rows=8, threads=1)
    try:
        assert asyncio.run(together(scheduler)) == asyncio.run(together(static)) == _solo(tiny_runtime, reqs)
    finally:
        static.close()


def test_a_cancelled_row_leaves_and_frees_its_cache(tiny_runtime, scheduler):
    long = GenerationRequest([5, 6, 7], None, max_new_tokens=2000)

    async def run():
        job = scheduler.submit(long, "long")
        async for _ in job.tokens():
            if job.produced >= 3:
                job.cancelled = True  # what the engine does when the client goes away
                break
        for _ in range(500):
            if scheduler.stats.rows_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        return job

    job = asyncio.run(run())
    assert scheduler.stats.rows_in_flight == 0 and job.produced < 100
    assert scheduler.stats.cancelled_rows == 1


def test_a_failing_row_fails_alone(tiny_runtime, scheduler):
    good = _requests(tiny_runtime, 3, seed=2)
    bad = GenerationRequest([5, 6], None, max_new_tokens=8, temperature=float("nan"))  # sampling raises

    async def run():
        jobs = [scheduler.submit(r) for r in good[:2]] + [scheduler.submit(bad)] + [scheduler.submit(good[2])]
        return await asyncio.gather(*[_collect(j) for j in jobs], return_exceptions=True)

    outs = asyncio.run(run())
    assert isinstance(outs[2], RowFailed)
    assert [outs[0], outs[1], outs[3]] == _solo(tiny_runtime, good)


def test_past_the_queue_cap_submit_refuses_at_once(tiny_runtime):
    s = Scheduler(tiny_runtime, max_rows=1, max_queue=2, threads=1)
    long = GenerationRequest([5, 6, 7], None, max_new_tokens=3000)

    async def run():
        jobs = [s.submit(long)]
        while s.stats.rows_in_flight == 0:
            await asyncio.sleep(0.001)
        jobs += [s.submit(long), s.submit(long)]  # the queue holds 2
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as e:
            s.submit(long)
        assert time.monotonic() - t0 < 0.1 and e.value.retry_after >= 1
        for j in jobs:
            j.cancelled = True
        return s.stats.rejected

    try:
        assert asyncio.run(run()) == 1
    finally:
        s.close()


def test_close_ends_running_rows_within_the_grace(tiny_runtime):
    s = Scheduler(tiny_runtime, max_rows=2, threads=1, grace=0.5)

    async def run():
        job = s.submit(GenerationRequest([5, 6, 7], None, max_new_tokens=100000))
        waiting = asyncio.ensure_future(_collect(job))
        while job.produced < 2:
            await asyncio.sleep(0.001)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, s.close)
        with pytest.raises(ShuttingDown):
            await waiting
        return time.monotonic() - t0

    assert asyncio.run(run()) < 3.0
    assert not s.alive()


def test_logprobs_come_with_the_token_when_asked(tiny_runtime, scheduler):
    req = GenerationRequest([5, 6, 7], None, max_new_tokens=4, top_logprobs=3)

    async def run():
        return [t async for t in scheduler.submit(req).tokens()]

    toks = asyncio.run(run())
    assert [t.id for t in toks] == tiny_runtime.generate([req])[0]
    for t in toks:
        assert len(t.top) == 3 and t.top[0][0] == t.id and t.logprob == pytest.approx(t.top[0][1])
        assert t.top[0][1] >= t.top[1][1] >= t.top[2][1] and t.logprob <= 0
