"""The chat engine, the adapter cache, region parsing and the detokenizer in-process, on the tiny random Llama: the
bulk of the bad-input cases without a live server (tests/test_service.py keeps what needs HTTP)."""
import asyncio
import dataclasses
import itertools

import pytest
import torch
from pydantic import ValidationError

from culign.serving.adapter_cache import AdapterCache, AdapterRefused, UnknownRegion
from culign.regions import BadRegionSpec, RegionSpec, parse_region
from culign.registry import Registry
from culign.serving.engines.scheduler import Scheduler
from culign.serving import ChatCompletionRequest, ChatRequest, ChatService, Detokenizer, ServingError
from culign.serving.settings import ServiceSettings, SettingsError

CAP = 32


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_runtime):
    root = tmp_path_factory.mktemp("adapters")
    reg = Registry(root)
    for seed, region in enumerate(["US", "CN"]):
        prompt = torch.randn(3, tiny_runtime.hidden_size, generator=torch.Generator().manual_seed(seed))
        reg.save(region, prompt, base_model=tiny_runtime.name, base_fingerprint=tiny_runtime.fingerprint,
                 provenance={"seed": seed})
    return reg


@pytest.fixture(scope="module")
def engine(tiny_runtime, registry):
    settings = ServiceSettings(adapters=registry.root, max_tokens=CAP, default_max_tokens=8, rescan_seconds=0.5)
    e = ChatService(tiny_runtime, registry, settings, engine=Scheduler(tiny_runtime, 4, 4, threads=1))
    yield e
    e.close()


def run(coro):
    return asyncio.run(coro)


def hi(**kw):
    return {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **kw}


# ---------------------------------------------------------------------------------------------------- regions
@pytest.mark.parametrize("value,spec", [("US", RegionSpec("US")), ("china@2", RegionSpec("china", 2)),
                                        ("a_b-c@10", RegionSpec("a_b-c", 10))])
def test_region_specs(value, spec):
    assert parse_region(value) == spec and str(spec) == value


BAD_SPECS = ["", "..", "../US", "US/1", "/etc/passwd", "%2e%2e", "US@-1", "US@1.0", "US@0", "US@", "@1", "US@1@2",
             "US\n", "U S", "\u0555S", "Ｕ\uff33", "US\x00", "x" * 65, "US@99999999999", "US@+1", "US@01"]


@pytest.mark.parametrize("value", BAD_SPECS)
def test_bad_region_specs_are_refused(value):
    with pytest.raises(BadRegionSpec) as e:
        parse_region(value, "X-Culign-Region")
    assert "X-Culign-Region" in str(e.value)


# ---------------------------------------------------------------------------------------------------- adapter cache
def test_cache_lookup_and_errors(tiny_runtime, registry):
    cache = AdapterCache(registry, tiny_runtime, rescan_every=60)
    assert cache.lookup(RegionSpec("us")).ref == "US@1"
    assert cache.lookup(RegionSpec("China")).ref == "CN@1"  # the CLI's aliases
    with pytest.raises(UnknownRegion) as e:
        cache.lookup(RegionSpec("Atlantis"), "model")
    assert e.value.source == "model" and e.value.available == ["CN", "US"] and "in model" in str(e.value)
    with pytest.raises(UnknownRegion):
        cache.lookup(RegionSpec("US", 7))


def test_cache_refuses_a_corrupt_version_with_the_reason_and_falls_back(tiny_runtime, tmp_path, caplog):
    reg = Registry(tmp_path)
    for seed in (1, 2):
        reg.save("SA", torch.randn(2, tiny_runtime.hidden_size), base_model=tiny_runtime.name,
                 base_fingerprint=tiny_runtime.fingerprint, provenance={"seed": seed})
    weights = tmp_path / "SA" / "2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    cache = AdapterCache(reg, tiny_runtime, rescan_every=60)
    assert cache.lookup(RegionSpec("SA")).ref == "SA@1"  # the latest that passes
    with pytest.raises(AdapterRefused) as e:
        cache.lookup(RegionSpec("SA", 2))
    assert "SA@2" in str(e.value) and "sha256" in str(e.value)
    for _ in range(3):
        with pytest.raises(AdapterRefused):
            cache.lookup(RegionSpec("SA", 2))
    assert sum("refusing adapter SA@2" in r.message for r in caplog.records) == 1  # logged once, not per request
    assert cache.available() == {"SA": [1]}


def test_cache_tells_when_disk_and_memory_differ(tiny_runtime, tmp_path, caplog):
    reg = Registry(tmp_path)
    reg.save("JP", torch.randn(2, tiny_runtime.hidden_size), base_model=tiny_runtime.name,
             base_fingerprint=tiny_runtime.fingerprint, provenance={})
    cache = AdapterCache(reg, tiny_runtime, rescan_every=60)
    before = cache.lookup(RegionSpec("JP"))
    weights = tmp_path / "JP" / "1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    cache.rescan()
    cache.rescan()
    assert sum("changed on disk" in r.message for r in caplog.records) == 1
    assert torch.equal(cache.lookup(RegionSpec("JP")).prompt, before.prompt)  # the verified copy still serves


# ---------------------------------------------------------------------------------------------------- engine
def test_engine_answers_like_the_runtime_alone(engine, tiny_runtime, registry):
    from culign.model import GenerationRequest, decoding

    body = ChatCompletionRequest(**hi(model="US", max_tokens=6))
    reply = run(engine.chat_completions(body, []))
    assert reply.status == 200, reply.body
    prompt = registry.load("US").prompt
    ids = tiny_runtime.chat_ids([{"role": "user", "content": "hello there"}])
    want = decoding.generate(tiny_runtime, [GenerationRequest(ids, prompt, 6)])[0]
    assert reply.body["choices"][0]["message"]["content"] == tiny_runtime.tokenizer.decode(want,
                                                                                            skip_special_tokens=True)
    assert reply.body["model"] == "US@1" and reply.body["usage"]["completion_tokens"] == len(want)


def test_logprobs_in_the_reply(engine):
    body = ChatCompletionRequest(**hi(logprobs=True, top_logprobs=2))
    reply = run(engine.chat_completions(body, []))
    content = reply.body["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    assert "".join(e["token"] for e in content).strip() in reply.body["choices"][0]["message"]["content"] + " "


def test_streaming_joins_to_the_plain_answer(engine):
    plain = run(engine.chat_completions(ChatCompletionRequest(**hi(max_tokens=8)), []))
    want = plain.body["choices"][0]["message"]["content"]

    async def stream():
        reply = await engine.chat_completions(ChatCompletionRequest(**hi(max_tokens=8, stream=True)), [])
        return [line async for line in reply.stream]

    import json
    lines = run(stream())
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want


def test_stop_string_ends_the_answer_before_it(engine):
    plain = run(engine.chat_completions(ChatCompletionRequest(**hi(max_tokens=16)), []))
    text = plain.body["choices"][0]["message"]["content"]
    assert len(text) >= 4, text
    stop = text[2:4]  # spans tokens: the tiny tokenizer has one token per character
    reply = run(engine.chat_completions(ChatCompletionRequest(**hi(max_tokens=16, stop=[stop, "zzzz"])), []))
    got = reply.body["choices"][0]
    assert got["message"]["content"] == text[:text.find(stop)] and got["finish_reason"] == "stop"


# the hostile corpus, in-process: every case a 4xx naming the parameter
HOSTILE = [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=CAP + 1), "max_tokens"),
    (dict(max_tokens=None, max_completion_tokens=0), "max_completion_tokens"),
    (dict(max_tokens=3, max_completion_tokens=4), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=2.5), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"),
    (dict(n=2), "n"), (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(stop=""), "stop"), (dict(stop=["x" * 300]), "stop"),
    (dict(top_logprobs=3), "top_logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(frequency_penalty=0.5), "frequency_penalty"), (dict(presence_penalty=-3), "presence_penalty"),
    (dict(store=True), "store"), (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (dict(messages=[{"role": "user", "content": "x" * 200000}]), "messages"),
    (dict(model="../../etc/passwd"), "model"), (dict(model="US@-1"), "model"), (dict(model="US@1.0"), "model"),
    (dict(model="Atlantis"), "model"), (dict(model="US@999"), "model"), (dict(model="U\u0405"), "model"),
] + [(({name: value}), name) for name, value in itertools.product(
    ["tools", "tool_choice", "functions", "response_format", "logit_bias", "parallel_tool_calls", "audio",
     "modalities"], [{"type": "json_object"}])]


@pytest.mark.parametrize("fields,param", HOSTILE, ids=[f"{p}-{i}" for i, (_, p) in enumerate(HOSTILE)])
def test_hostile_values_get_a_4xx_naming_the_parameter(engine, fields, param):
    reply = run(engine.chat_completions(ChatCompletionRequest(**hi(**fields)), []))
    assert 400 <= reply.status < 500, reply.body
    assert reply.body["error"]["param"] == param, reply.body


@pytest.mark.parametrize("header,status", [(["../x"], 400), (["US", "CN"], 400), (["US@9"], 404),
                                           (["Narnia"], 404), (["US@x"], 400), (["US\x00"], 400)])
def test_hostile_headers(engine, header, status):
    reply = run(engine.chat(ChatRequest(**hi()), header))
    assert reply.status == status and reply.body["error"]["param"] == "X-Culign-Region", reply.body


@pytest.mark.parametrize("fields", [dict(max_tokens=True), dict(max_tokens="5"), dict(temperature="hot"),
                                    dict(stream="yes"), dict(messages="hi"), dict(messages=[{"role": "wizard",
                                                                                             "content": "x"}]),
                                    dict(messages=[{"role": "user", "content": 5}]), dict(seed=1.5),
                                    dict(unknown_field=1), dict(stop=5), dict(logprobs=1)])
def test_wrong_types_fail_the_request_model(fields):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**hi(**fields))


def test_engine_still_answers_after_the_corpus(engine):
    assert run(engine.chat(ChatRequest(**hi()), ["US"])).status == 200


# ---------------------------------------------------------------------------------------------------- detokenizer
class Chars:
    """A tokenizer whose tokens are byte strings: multi-byte characters split across tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_back_a_split_character_and_a_possible_stop():
    pieces = [b"h", b"\xc3", b"\xa9", b"ll", b"o", b" ", b"w", b"o", b"rld", b"!"]
    d = Detokenizer(Chars(pieces), stop_ids={99}, stop=["o w"])
    out = [d.push(i) for i in range(len(pieces))]
    assert out[:3] == ["h", "", "\u00e9"]  # the 2-byte character comes out whole
    assert d.stopped and "".join(out) + d.flush() == "h\u00e9ll" and d.text() == "h\u00e9ll"


def test_detokenizer_without_stop_strings_passes_everything():
    pieces = [b"a", b"b", b"\xe2\x82", b"\xac", b"c"]
    d = Detokenizer(Chars(pieces), stop_ids=set())
    assert "".join(d.push(i) for i in range(5)) + d.flush() == "ab\u20acc"


# ---------------------------------------------------------------------------------------------------- settings
def test_settings_from_env(tmp_path):
    s = ServiceSettings.from_env({"CULIGN_ADAPTERS": str(tmp_path), "CULIGN_MAX_BATCH": "4",
                                  "CULIGN_LOG_LEVEL": "debug"})
    assert s.adapters == tmp_path and s.max_rows == 4 and s.log_level == "DEBUG"
    for env, name in [({"CULIGN_MAX_TOKENS": "lots"}, "CULIGN_MAX_TOKENS"), ({"CULIGN_MAX_QUEUE": "-1"},
                      "CULIGN_MAX_QUEUE"), ({"CULIGN_SCHEDULER": "fancy"}, "CULIGN_SCHEDULER"),
                      ({"CULIGN_LOG_LEVEL": "LOUD"}, "CULIGN_LOG_LEVEL"),
                      ({"CULIGN_MAX_HEADER_BLOCK_BYTES": "4096"}, "CULIGN_MAX_HEADER_BLOCK_BYTES"),
                      ({"CULIGN_VLLM_TENSOR_PARALLEL": "0"}, "CULIGN_VLLM_TENSOR_PARALLEL"),
                      ({"CULIGN_VLLM_TENSOR_PARALLEL": "2", "CULIGN_ENGINE": "culign"},
                       "CULIGN_VLLM_TENSOR_PARALLEL.*CULIGN_ENGINE=vllm"),
                      ({"CULIGN_ENGINE": "tgi"}, "CULIGN_ENGINE")]:
        with pytest.raises(SettingsError, match=name):
            ServiceSettings.from_env({"CULIGN_ADAPTERS": str(tmp_path), **env})
    assert ServiceSettings.from_env({"CULIGN_ADAPTERS": str(tmp_path), "CULIGN_ENGINE": "vllm",
                                     "CULIGN_VLLM_TENSOR_PARALLEL": "4"}).vllm_tensor_parallel == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_rows = 3  # frozen


def test_the_default_engine_is_vllm_where_installed(tmp_path, monkeypatch):
    import importlib.util

    from culign.serving import settings as S

    installed = importlib.util.find_spec("vllm") is not None
    env = {"CULIGN_ADAPTERS": str(tmp_path)}
    assert S.default_engine() == ("vllm" if installed else "culign")
    assert ServiceSettings.from_env(env).engine == ServiceSettings.from_env({**env, "CULIGN_ENGINE": "auto"}).engine \
        == S.default_engine()
    assert ServiceSettings.from_env({**env, "CULIGN_ENGINE": "culign"}).engine == "culign"  # asked for, kept
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert ServiceSettings.from_env(env).engine == "culign"  # without the extra: culign's own


def test_a_full_queue_is_a_429_with_retry_after(tiny_runtime, registry):
    settings = ServiceSettings(adapters=registry.root, max_tokens=4000, default_max_tokens=8)
    e = ChatService(tiny_runtime, registry, settings, engine=Scheduler(tiny_runtime, 1, 0, threads=1))

    async def go():
        long = ChatCompletionRequest(**hi(max_tokens=3000, stream=True))
        first = await e.chat_completions(long, [])  # takes the one row
        await first.stream.__anext__()
        while e.engine.stats.rows_in_flight < 1:  # it is decoding
            await asyncio.sleep(0.01)
        second = await e.chat_completions(ChatCompletionRequest(**hi()), [])
        await first.stream.aclose()  # the client goes away: its row is cancelled
        return second

    try:
        reply = run(go())
    finally:
        e.close()
    assert reply.status == 429 and int(reply.headers["Retry-After"]) >= 1
    assert reply.body["error"]["type"] == "rate_limit_error"


def test_a_region_the_scan_refused_is_answered_with_the_reason(tiny_runtime, tmp_path):
    reg = Registry(tmp_path)
    reg.save("KE", torch.randn(2, tiny_runtime.hidden_size), base_model=tiny_runtime.name,
             base_fingerprint=tiny_runtime.fingerprint, provenance={})
    weights = tmp_path / "KE" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated
    cache = AdapterCache(reg, tiny_runtime, rescan_every=60)
    for spec in (RegionSpec("KE"), RegionSpec("ke", 1)):
        with pytest.raises(AdapterRefused) as e:
            cache.lookup(spec)
        assert "KE@1" in str(e.value) and "refused" in str(e.value)
    with pytest.raises(UnknownRegion):
        cache.lookup(RegionSpec("KE", 2))


def test_api_key_grants_are_checked_before_the_registry(engine):
    """A region outside the caller's grant is a 403 naming where it came from, known to the registry or not; the
    base model needs its own grant; /v1/models lists what the grant allows."""
    us_only = lambda region: region == "US"

    async def go():
        ok = await engine.chat_completions(ChatCompletionRequest(**hi(model="US")), [], allow=us_only)
        alias = await engine.chat(ChatRequest(**hi()), ["china"], allow=us_only)
        unknown = await engine.chat(ChatRequest(**hi()), ["Atlantis"], allow=us_only)
        base = await engine.chat(ChatRequest(**hi()), [], allow=us_only)
        base_ok = await engine.chat(ChatRequest(**hi()), [], allow=lambda r: r is None)
        models = await engine.models(allow=us_only)
        return ok, alias, unknown, base, base_ok, models
    ok, alias, unknown, base, base_ok, models = run(go())
    assert ok.status == 200
    assert (alias.status, alias.body["error"]["param"]) == (403, "X-Culign-Region")
    assert (unknown.status, unknown.body["error"]["param"]) == (403, "X-Culign-Region")  # no 404: nothing leaks
    assert base.status == 403 and "base model" in base.body["error"]["message"]
    assert base_ok.status == 200
    assert [m["id"] for m in models.body["data"]] == ["US"]


# ---------------------------------------------------------------------------------------------------- every engine
@pytest.mark.parametrize("kind", ["continuous", "static", "vllm"])
def test_logprobs_on_every_engine_and_scheduler(kind, request, tiny_runtime, tmp_path):
    """``logprobs: true`` is answered with numbers whichever engine decodes: culign's continuous scheduler, its static
    batcher (which once pushed tokens without them, answering nulls) and vLLM."""
    from culign.serving import build_engine

    body = ChatCompletionRequest(**hi(logprobs=True, top_logprobs=2))
    if kind == "vllm":
        vllm_engine = request.getfixturevalue("vllm_engine")  # the session's engine: not closed here
        service = ChatService(vllm_engine.runtime, Registry(tmp_path), ServiceSettings(adapters=tmp_path),
                              engine=vllm_engine)
        reply = vllm_engine.test_loop.run(service.chat_completions(body, []))
    else:
        settings = ServiceSettings(adapters=tmp_path, scheduler=kind, max_tokens=CAP, default_max_tokens=8)
        service = ChatService(tiny_runtime, Registry(tmp_path), settings, engine=build_engine(settings, tiny_runtime))
        assert type(service.engine).__name__ == {"continuous": "Scheduler", "static": "StaticBatcher"}[kind]
        try:
            reply = run(service.chat_completions(body, []))
        finally:
            service.close()
    assert reply.status == 200, reply.body
    content = reply.body["choices"][0]["logprobs"]["content"]
    assert content and all(isinstance(entry["logprob"], float) and entry["logprob"] <= 0 for entry in content)
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)


def test_a_keys_share_is_given_back_however_its_requests_end(engine):
    """Places a key holds are given back when its request ends: answered, streamed to the end, or dropped early."""
    async def go():
        for _ in range(3):
            reply = await engine.chat_completions(ChatCompletionRequest(**hi()), [], client="key-1")
            assert reply.status == 200
        stream = await engine.chat_completions(ChatCompletionRequest(**hi(stream=True, max_tokens=20)), [],
                                               client="key-1")
        await stream.stream.__anext__()
        await stream.stream.aclose()  # the client goes away mid-stream
        for _ in range(50):
            if engine.shares.held("key-1") == 0:
                return 0
            await asyncio.sleep(0.05)
        return engine.shares.held("key-1")

    assert run(go()) == 0
