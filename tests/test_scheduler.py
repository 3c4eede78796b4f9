"""The continuous-batching scheduler on the tiny random Llama: rows joining mid-way get their solo output, finished
and cancelled rows leave and free their cache, a failing row fails alone, the queue is bounded, close is prompt."""
import asyncio
import time

import pytest
import torch

from culign.model import GenerationRequest, decoding
from culign.serving.engines import QueueFull, RowFailed, ShuttingDown
from culign.serving.engines.scheduler import Scheduler, StaticBatcher


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
    return [decoding.generate(rt, [r])[0] for r in requests]


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
    assert [t.id for t in toks] == decoding.generate(tiny_runtime, [req])[0]
    for t in toks:
        assert len(t.top) == 3 and t.top[0][0] == t.id and t.logprob == pytest.approx(t.top[0][1])
        assert t.top[0][1] >= t.top[1][1] >= t.top[2][1] and t.logprob <= 0


def _mixes(rt, worker, n_mixes, seed, max_new=10):
    """(differing answers, answers) over random mixes of requests, some joining mid-way, against solo decodes."""
    import random

    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [None] + [torch.randn(3, rt.hidden_size, generator=g) * 0.05 for _ in range(3)]
    questions = ["What matters most in raising children?", "What makes a good leader?",
                 "Should employees question their manager's decisions? Say why."]
    differ = total = 0

    async def run(reqs, delays):
        async def one(r, d):
            await asyncio.sleep(d)
            return await _collect(worker.submit(r))
        return await asyncio.gather(*(one(r, d) for r, d in zip(reqs, delays)))

    for _ in range(n_mixes):
        reqs = [GenerationRequest(rt.chat_ids([{"role": "user", "content": rnd.choice(questions)}]),
                                  rnd.choice(prompts), rnd.randint(3, max_new)) for _ in range(rnd.randint(2, 5))]
        outs = asyncio.run(run(reqs, [rnd.choice([0.0, 0.05]) for _ in reqs]))
        for r, out in zip(reqs, outs):
            differ += out != asyncio.run(run([r], [0.0]))[0]
            total += 1
    return differ, total


def test_bf16_rows_decode_exactly_as_alone(tiny_model):
    """In bf16 each decode step attends row by row (culign.model.runtime._rowwise_sdpa): no neighbour changes a row.
    (The tiny model happens not to differ even without it; the SmolLM2 test below does: 1 of 16 answers.)"""
    import copy

    from culign.model import Runtime

    model, tok = tiny_model
    rt = Runtime(copy.deepcopy(model).to(torch.bfloat16), tok, "tiny-bf16", "cpu", torch.bfloat16)
    assert rt.batch_invariant and rt.model.config._attn_implementation == "culign_rowwise_sdpa"
    worker = Scheduler(rt, max_rows=8, threads=1)
    try:
        differ, total = _mixes(rt, worker, 6, seed=0)
        assert total >= 12 and differ == 0
    finally:
        worker.close()
    assert Runtime(copy.deepcopy(model), tok, "tiny", "cpu", torch.float32).batch_invariant is False  # fp32 batches


@pytest.mark.real
def test_smollm2_bf16_greedy_answers_are_batch_invariant_where_promised():
    from culign.model import Runtime, cpu_bf16_native

    if not cpu_bf16_native():
        pytest.skip("bf16 is emulated on this CPU (~65x slower than fp32): the service runs fp32 here, which "
                    "batches invariantly without row-wise attention")
    rt = Runtime.load(dtype="bfloat16")
    worker = Scheduler(rt, max_rows=8)
    try:
        promise = worker.invariance()
        differ, total = _mixes(rt, worker, 4, seed=1, max_new=12)
    finally:
        worker.close()
    assert total >= 8
    if promise.batch_invariant:  # promised (measured so on this kind of CPU): it must hold
        assert differ == 0, promise.why
    else:  # not promised here (AVX512-BF16 without AMX): the service must say so, as /v1/models and the log do
        assert "differed" in promise.why and "float32" in promise.why
        print(f"bf16 on this CPU: {differ} of {total} answers differed from solo; the engine says: {promise.why}")
