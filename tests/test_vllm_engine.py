"""The vLLM engine behind culign's seam, in-process on the real model (one engine for the whole session, float32
eager): the same greedy tokens as culign's own runtime, alone and in a batch, with soft prompts passed as
embeddings; logprobs, seeds, cancellation, the queue bound; and vLLM's prefix cache never handing one soft
prompt's KV blocks to another."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from culign.serving.engines import QueueFull
from culign.registry import Registry
from culign.model import GenerationRequest, decoding

pytestmark = [pytest.mark.real]

QUESTIONS = ["What matters most in raising children?", "Should employees question their manager's decisions?",
             "Describe the ideal boss.", "How should a family make a big decision?"]


@pytest.fixture(scope="module")
def prompts():
    reg = Registry("adapters")
    return {r: reg.load(r, 1).prompt for r in ("US", "CN", "IN", "SA")}


def ids(rt, question: str) -> list[int]:
    return rt.chat_ids([{"role": "user", "content": question}])


async def collect(job):
    return [t async for t in job.tokens()]


def solo(engine, request: GenerationRequest):
    async def go():
        return await collect(engine.submit(request))
    return engine.test_loop.run(go())


def test_greedy_tokens_match_culign_runtime_with_and_without_soft_prompt(vllm_engine, prompts):
    rt = vllm_engine.runtime
    for region, question in [(None, QUESTIONS[0]), ("US", QUESTIONS[0]), ("CN", QUESTIONS[1])]:
        request = GenerationRequest(ids(rt, question), prompts.get(region), 16)
        got = [t.id for t in solo(vllm_engine, request)]
        assert got == decoding.generate(rt, [request])[0], region


def test_batched_greedy_answers_equal_solo_ones_in_float32(vllm_engine, prompts):
    """8 requests (4 regions and the base model, 4..20 tokens) at once through 4 rows: each answer as alone."""
    rt = vllm_engine.runtime
    regions = ["US", "CN", None, "IN", "SA", None, "CN", "US"]
    requests = [GenerationRequest(ids(rt, QUESTIONS[i % 4]), prompts.get(r), 4 + 2 * i)
                for i, r in enumerate(regions)]
    want = [[t.id for t in solo(vllm_engine, r)] for r in requests]

    async def together():
        return await asyncio.gather(*(collect(vllm_engine.submit(r)) for r in requests))
    got = vllm_engine.test_loop.run(together())
    assert [[t.id for t in g] for g in got] == want
    assert vllm_engine.invariance().batch_invariant


def test_logprobs_match_the_runtimes(vllm_engine, prompts):
    rt = vllm_engine.runtime
    request = GenerationRequest(ids(rt, QUESTIONS[2]), prompts["US"], 3, top_logprobs=3)
    tokens = solo(vllm_engine, request)
    first = tokens[0]
    logp = rt.next_token_logits([(request.input_ids, request.soft_prompt)])[0].log_softmax(-1)
    values, best = logp.topk(3)
    assert [i for i, _ in first.top] == best.tolist()
    assert first.logprob == pytest.approx(float(logp[first.id]), abs=1e-3)
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-3)
    assert all(len(t.top) == 3 for t in tokens)
    no_top = solo(vllm_engine, GenerationRequest(request.input_ids, request.soft_prompt, 2, top_logprobs=0))
    assert no_top[0].logprob is not None and no_top[0].top == ()
    plain = solo(vllm_engine, GenerationRequest(request.input_ids, request.soft_prompt, 2))
    assert plain[0].logprob is None


def test_seed_gives_the_same_sample(vllm_engine, prompts):
    rt = vllm_engine.runtime
    make = lambda seed: GenerationRequest(ids(rt, QUESTIONS[3]), prompts["IN"], 12, temperature=1.0, top_p=0.95,
                                          seed=seed)
    a, b = ([t.id for t in solo(vllm_engine, make(7))] for _ in range(2))
    assert a == b
    others = {tuple(t.id for t in solo(vllm_engine, make(s))) for s in (1, 2, 3)}
    assert len(others | {tuple(a)}) > 1  # the seed matters
    big = [t.id for t in solo(vllm_engine, make(2**64 - 1))]  # the OpenAI range culign accepts
    assert len(big) >= 1


def test_prefix_cache_never_shares_blocks_across_soft_prompts(vllm_engine, prompts):
    """A prompt over several KV blocks: the same soft prompt again hits vLLM's prefix cache (so the cache is on and
    this test can see it); another soft prompt over the same tokens, or the same region's prompt changed (a version
    replaced on disk), gets no cached block and its own answer."""
    rt = vllm_engine.runtime
    block = vllm_engine.llm.vllm_config.cache_config.block_size
    long_q = "Tell me about family, work and tradition. " * (2 * block // 8 + 4)
    tokens = ids(rt, long_q)
    assert len(tokens) > 2 * block
    replaced = prompts["US"].clone()
    replaced[0] += 0.01  # one vector nudged: what a retrained version saved under the same number looks like
    runs = [("US", prompts["US"]), ("US", prompts["US"]), ("CN", prompts["CN"]), ("US-replaced", replaced),
            ("base", None)]
    cached = {}
    for name, prompt in runs:
        request = GenerationRequest(tokens, prompt, 6)

        async def go(request=request):
            job = vllm_engine.submit(request)
            return await collect(job), job.cached_tokens
        got, hits = vllm_engine.test_loop.run(go())
        assert [t.id for t in got] == decoding.generate(rt, [request])[0], name
        cached.setdefault(name, []).append(hits)
    assert cached["US"][0] == 0 and cached["US"][1] >= block  # the cache works: the same prompt shares blocks
    assert cached["CN"] == [0] and cached["US-replaced"] == [0] and cached["base"] == [0]


def test_cancel_aborts_the_vllm_request(vllm_engine):
    rt = vllm_engine.runtime
    before = vllm_engine.stats.cancelled_rows

    async def go():
        job = vllm_engine.submit(GenerationRequest(ids(rt, "Tell me a very long story."), None, 400))
        got = []
        async for t in job.tokens():
            got.append(t)
            if len(got) == 3:
                job.cancel()
        return got
    got = vllm_engine.test_loop.run(go())
    assert len(got) < 400
    deadline = time.monotonic() + 30
    while vllm_engine.llm.get_num_unfinished_requests() or vllm_engine._active:
        assert time.monotonic() < deadline, "the cancelled request kept decoding in vLLM"
        time.sleep(0.1)
    assert vllm_engine.stats.cancelled_rows == before + 1


def test_queue_bound_is_culigns(vllm_engine):
    """max_rows (4) + max_queue (4) requests in flight, then QueueFull at once: culign's admission control."""
    rt = vllm_engine.runtime

    async def go():
        jobs = [vllm_engine.submit(GenerationRequest(ids(rt, "Count to a thousand."), None, 300)) for _ in range(8)]
        try:
            vllm_engine.submit(GenerationRequest(ids(rt, "hi"), None, 1))
            refused = None
        except QueueFull as e:
            refused = e
        for j in jobs:
            j.cancel()
        for j in jobs:
            await collect(j)
        return refused
    refused = vllm_engine.test_loop.run(go())
    assert refused is not None and refused.retry_after >= 1
    deadline = time.monotonic() + 30
    while vllm_engine._active:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_chat_service_on_vllm_answers_429_past_the_bound(vllm_engine, tmp_path):
    """culign's chat engine in front of vLLM: 8 streams fill 4 rows and 4 waiting places; the 9th request is a 429
    with Retry-After, before any vLLM request is made for it."""
    from culign.serving import ChatCompletionRequest, ChatService, ServiceSettings

    reg = Registry("adapters")
    chat = ChatService(vllm_engine.runtime, reg, ServiceSettings(adapters=reg.root, max_tokens=512),
                       engine=vllm_engine)
    body = lambda n, stream: ChatCompletionRequest(messages=[{"role": "user", "content": "Count to a thousand."}],
                                                   max_tokens=n, stream=stream, model="US")

    async def go():
        streams = [await chat.chat_completions(body(400, True), []) for _ in range(8)]
        assert all(s.status == 200 for s in streams)
        refused = await chat.chat_completions(body(2, False), [])
        for s in streams:
            await s.stream.aclose()  # never read: the jobs are cancelled through ChatService's own path below
        return refused
    try:
        refused = vllm_engine.test_loop.run(go())
    finally:
        for job in list(vllm_engine._active):
            job.cancel()
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.body["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 30
    while vllm_engine._active:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_engine_is_built_with_culigns_parallelism(vllm_engine):
    # CULIGN_VLLM_TENSOR_PARALLEL reaches vLLM's engine arguments (1 here: one CPU device; N shards over N GPUs)
    assert vllm_engine.llm.vllm_config.parallel_config.tensor_parallel_size == 1
