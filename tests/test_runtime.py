"""Soft-prompt injection, shared-prefix scoring and batched generation on a tiny random Llama."""
import pytest
import torch

from culign.model import GenerationRequest, decoding, scoring, weights_fingerprint
from culign.model.hardware import _bf16_probe, cpu_bf16_native, cpu_capability, parse_dtype
from culign.scorer import SurveyScorer
from culign.survey import Survey


def _prompt(rt, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rt.hidden_size, generator=g) * rt.embedding_matrix.float().std()


@pytest.fixture(scope="module")
def rows(tiny_runtime):
    rt = tiny_runtime
    ids = lambda s: rt.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        (ids("hello there, how are you?"), _prompt(rt, 4, 1)),
        (ids("short"), None),
        (ids("a different prompt of some length"), _prompt(rt, 7, 2)),
        (ids("abc"), _prompt(rt, 2, 3)),
    ]


def test_mixed_batch_equals_each_row_alone(tiny_runtime, rows):
    batched = tiny_runtime.next_token_logits(rows)
    for i, row in enumerate(rows):
        alone = tiny_runtime.next_token_logits([row])[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


def test_soft_prompt_changes_the_output(tiny_runtime, rows):
    ids, prompt = rows[0]
    assert not torch.allclose(tiny_runtime.next_token_logits([(ids, prompt)]),
                              tiny_runtime.next_token_logits([(ids, None)]))


def test_injection_is_prepending_embeddings(tiny_runtime, rows):
    """The soft prompt sits before the token embeddings, positions counted from it (as HF PEFT does)."""
    ids, prompt = rows[0]
    rt = tiny_runtime
    embeds = torch.cat([prompt, rt.model.get_input_embeddings()(torch.tensor(ids))]).unsqueeze(0)
    with torch.no_grad():
        ref = rt.model(inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(rt.next_token_logits([(ids, prompt)])[0], ref, atol=1e-5, rtol=1e-5)


def test_greedy_generation_batched_equals_alone(tiny_runtime, rows):
    reqs = [GenerationRequest(ids, p, max_new_tokens=6 + i) for i, (ids, p) in enumerate(rows)]
    reqs.append(GenerationRequest(rows[0][0], rows[0][1], max_new_tokens=5, temperature=0.9, seed=7))
    batched = decoding.generate(tiny_runtime, reqs)
    for r, out in zip(reqs, batched):
        assert out == decoding.generate(tiny_runtime, [r])[0]
        assert 0 < len(out) <= r.max_new_tokens
    assert batched[0] != batched[2] or rows[0][0] != rows[2][0]


def test_shared_prefix_scoring_equals_full_forward(tiny_runtime):
    rt = tiny_runtime
    enc = lambda s: rt.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    shared = enc("common prefix: ")
    groups = [(enc("group one; "), [enc("q one?"), enc("question two is longer?"), enc("x")]),
              ([], [enc("a lone item?")]),
              (enc("g3 "), [enc("yes?"), enc("no?")])]
    prompts = torch.stack([_prompt(rt, 3, s) for s in range(5)])
    options = rt.option_token_ids(list("12345"))
    got = scoring.option_logprobs(rt, shared, groups, prompts, options, block=2)  # forces blocks, the last one padded
    assert [g.shape for g in got] == [(5, 3, 5), (5, 1, 5), (5, 2, 5)]
    for (prefix, suffixes), part in zip(groups, got):
        for s in range(5):
            full = rt.next_token_logits([(shared + prefix + suf, prompts[s]) for suf in suffixes])
            torch.testing.assert_close(part[s], full.log_softmax(-1)[:, options], atol=1e-4, rtol=1e-4)
    naive = scoring.option_logprobs(rt, shared, groups, None, options)
    for (prefix, suffixes), part in zip(groups, naive):
        ref = rt.next_token_logits([(shared + prefix + suf, None) for suf in suffixes]).log_softmax(-1)[:, options]
        torch.testing.assert_close(part[0], ref, atol=1e-4, rtol=1e-4)


def test_scorer_on_tiny_model(tiny_runtime):
    survey = Survey.load()
    scorer = SurveyScorer(tiny_runtime, survey, ["standard", "reversed", "terse/form/asc"])
    prompts = torch.stack([_prompt(tiny_runtime, 4, s) for s in range(3)])
    answers = scorer.answers(prompts)
    assert set(answers) == {"vsm/chat/asc", "vsm/chat/desc", "terse/form/asc"}
    for a in answers.values():
        assert a.expected.shape == a.mass.shape == (3, 24)
        assert ((a.expected >= 1.0) & (a.expected <= 5.0)).all() and ((a.mass > 0) & (a.mass <= 1.0)).all()
    assert not torch.equal(answers["vsm/chat/asc"].expected[0], answers["vsm/chat/asc"].expected[1])
    # one candidate alone costs one candidate, and scores as it does in the population (float32: to rounding)
    alone = scorer.answers(prompts[1:2], ["terse/form/asc"])["terse/form/asc"].expected[0]
    torch.testing.assert_close(alone, answers["terse/form/asc"].expected[1], atol=1e-5, rtol=0)
    # item sharing: fewer tokens than asking every item in full
    for name, p in scorer.prepared.items():
        full = sum(len(tiny_runtime.chat_ids(p.presentation.messages(it.id), p.presentation.prefill))
                   for it in survey.items)
        assert scorer.tokens(name) < full


def test_dtype_and_fingerprint(tiny_runtime):
    # generation: bf16 only where the CPU multiplies it natively (emulated bf16 is ~65x slower than fp32)
    assert parse_dtype("auto", "cpu") == (torch.bfloat16 if cpu_bf16_native() else torch.float32)
    assert parse_dtype("fp32", "cpu") == torch.float32
    assert parse_dtype(None, "cpu", scoring=True) == torch.float32  # survey scoring: float32 on every device
    assert parse_dtype("bf16", "cpu", scoring=True) == torch.bfloat16  # unless asked otherwise
    with pytest.raises(ValueError):
        parse_dtype("int3", "cpu")
    fp = weights_fingerprint(tiny_runtime.model)
    assert fp == tiny_runtime.fingerprint and fp.startswith("sha256:")
    # a checkpoint stored in bf16 fingerprints the same whether loaded in bf16 or fp32; other weights differ
    import copy

    bf16 = copy.deepcopy(tiny_runtime.model).to(torch.bfloat16)
    assert weights_fingerprint(bf16) == weights_fingerprint(copy.deepcopy(bf16).to(torch.float32))
    assert weights_fingerprint(bf16) != fp


def test_decode_worker_sets_its_own_thread_count(tiny_runtime, rows):
    """The service loads on one thread and decodes on the worker's count (libgomp spin throttling: see
    culign.serving.load_runtime); the count is per thread, so the worker's setting must not leak back."""
    import asyncio
    import threading

    from culign.serving.engines.scheduler import Scheduler

    seen = []

    class Recording(Scheduler):
        def _prefill(self, job):
            seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return super()._prefill(job)

    before = torch.get_num_threads()
    worker_threads = 1 if before > 1 else 2
    worker = Recording(tiny_runtime, threads=worker_threads)

    async def one() -> list[int]:
        job = worker.submit(GenerationRequest(rows[0][0], rows[0][1], max_new_tokens=4))
        return [t.id async for t in job.tokens()]

    try:
        tokens = asyncio.run(one())
    finally:
        worker.close()
    assert tokens == decoding.generate(tiny_runtime, [GenerationRequest(rows[0][0], rows[0][1], max_new_tokens=4)])[0]
    assert seen == [(False, worker_threads)]
    assert torch.get_num_threads() == before


def test_cpu_capability_is_read_and_probed():
    assert isinstance(cpu_bf16_native(), bool) and isinstance(_bf16_probe(), bool)
    assert torch.backends.cpu.get_cpu_capability() in cpu_capability()


def test_bf16_runtime_reads_the_answer_in_float32(tiny_model):
    """In bf16 the trunk stays bf16 while the final norm, head and softmax run in float32: the logits equal a
    float32 norm + head applied to the bf16 trunk's output; the weights and state_dict() stay as loaded (so the
    fingerprint equals a float32 load of the same values); patching twice is a no-op."""
    import copy

    from culign.model import Runtime

    model, tok = tiny_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fp32_same_values = copy.deepcopy(bf16).float()
    keys = set(bf16.state_dict())
    rt = Runtime(bf16, tok, "tiny-bf16", "cpu", torch.bfloat16)
    assert rt.fp32_answer and set(rt.model.state_dict()) == keys
    assert all(p.dtype == torch.bfloat16 for p in rt.model.parameters())
    assert rt.fingerprint == Runtime(fp32_same_values, tok, "tiny-fp32", "cpu", torch.float32).fingerprint

    seen = {}
    hook = rt.model.base_model.norm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    logits = rt.next_token_logits([(ids, None)])[0]
    hook.remove()
    assert logits.dtype == torch.float32 and seen["x"].dtype == torch.bfloat16  # the trunk's output is bf16
    with torch.inference_mode():
        ref = fp32_same_values.lm_head(fp32_same_values.model.norm(seen["x"][0, -1].float()))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)

    Runtime(bf16, tok, "again", "cpu", torch.bfloat16)  # a second runtime on the same model patches nothing more
    assert set(bf16.state_dict()) == keys and rt.next_token_logits([(ids, None)])[0].equal(logits)
    plain = Runtime(copy.deepcopy(model).to(torch.bfloat16), tok, "plain", "cpu", torch.bfloat16, fp32_answer=False)
    plain_logits = plain.next_token_logits([(ids, None)])[0]
    assert not torch.equal(plain_logits, logits)  # the bf16 head rounds
    torch.testing.assert_close(plain_logits, logits, atol=0.1, rtol=0.05)


def test_a_tiny_temperature_samples_like_greedy(tiny_runtime):
    """temperature 1e-40 used to divide the logits into inf (softmax: NaN, and an error for the whole batch)."""
    logits = torch.tensor([1.0, 3.0, 2.0, -5.0])
    r = GenerationRequest([1], temperature=1e-40, seed=0)
    g = torch.Generator().manual_seed(0)
    assert all(decoding.pick(logits, r, g) == 1 for _ in range(20))
    for t in (5e-324, 1e-300, 1e-7, 1e-5):  # 1e-300 is 0 in float32 (0 / 0 = NaN: a 503 found by schemathesis)
        assert decoding.pick(logits, GenerationRequest([1], temperature=t, seed=0), g) == 1
    ids = tiny_runtime.tokenizer("abc", add_special_tokens=False)["input_ids"]
    sampled = decoding.generate(tiny_runtime, [GenerationRequest(ids, temperature=1e-40, seed=3, max_new_tokens=4)])[0]
    assert sampled == decoding.generate(tiny_runtime, [GenerationRequest(ids, max_new_tokens=4)])[0]


def test_vllm_side_runtime_is_held_in_the_checkpoints_dtype(real_runtime, tmp_path):
    """Beside vLLM the worker only embeds and fingerprints: it holds the embedded model in its stored bf16 (half of a
    float32 copy), its embeddings upcast to exactly the float32 runtime's, its fingerprint is the same, and the
    adapters it hands to vLLM stay float32."""
    from culign.model.loading import stored_dtype
    from culign.registry import Registry
    from culign.serving.adapter_cache import AdapterCache
    from culign.serving.engines import load_runtime
    from culign.serving.settings import ServiceSettings

    assert stored_dtype(None) == torch.bfloat16
    threads = torch.get_num_threads()
    try:
        side = load_runtime(ServiceSettings(adapters=tmp_path, engine="vllm"))
    finally:
        torch.set_num_threads(threads)  # it loads on one thread (see its docstring)
    assert side.dtype == torch.bfloat16 and side.fingerprint == real_runtime.fingerprint
    ids = torch.arange(0, 2000, 7)
    with torch.inference_mode():
        embed = side.model.get_input_embeddings()(ids).float()
        assert torch.equal(embed, real_runtime.model.get_input_embeddings()(ids))
    prompt = torch.randn(4, side.hidden_size)
    Registry(tmp_path).save("US", prompt, base_model=side.name, base_fingerprint=side.fingerprint,
                            provenance={"seed": 0})
    cache = AdapterCache(Registry(tmp_path), side, prompt_dtype=torch.float32)
    from culign.regions import RegionSpec

    adapter = cache.lookup(RegionSpec("US"))
    assert adapter.prompt.dtype == torch.float32 and torch.equal(adapter.prompt, prompt)
