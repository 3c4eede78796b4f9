"""The service on the second embedded model: `bentoml serve` with CULIGN_MODEL=embedded:Qwen2.5-Coder-1.5B-Instruct
on each engine (culign's, vLLM), a region's soft prompt of the model's width prepended per request, and a prompt
made for another model refused. Skipped only where culign[qwen] is not installed (make setup installs it)."""
from __future__ import annotations

import gc

import httpx
import pytest
import torch

from culign.model import Runtime
from culign.registry import Registry
from reliability.harness import serve

from test_qwen import QWEN, qwen_installed

pytestmark = [pytest.mark.real, pytest.mark.server,
              pytest.mark.skipif(not qwen_installed(), reason="culign[qwen] is not installed (make setup installs it)")]


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory):
    """US: a random soft prompt of Qwen's width (1536) saved for its fingerprint. The model is loaded in bf16 only
    to read its width and fingerprint (dtype-independent), then freed before any server starts."""
    rt = Runtime.load(QWEN, dtype="bfloat16")
    width, fingerprint = rt.hidden_size, rt.fingerprint
    std = rt.embedding_matrix.float().std().item()
    del rt
    gc.collect()
    root = tmp_path_factory.mktemp("qwen-adapters")
    g = torch.Generator().manual_seed(0)
    Registry(root).save("US", torch.randn(8, width, generator=g) * std, base_model=QWEN,
                        base_fingerprint=fingerprint, provenance={"seed": 0})
    return root


@pytest.mark.parametrize("engine", ["culign", "vllm"])
def test_it_serves_regions_on_both_engines(tmp_path, registry_root, engine):
    if engine == "vllm":
        from conftest import need_vllm
        need_vllm()
    # 1.5B weights: vLLM on one core took over 300 s to start while other jobs ran (CI, 2026-12-06); ~2 min alone
    with serve(tmp_path, registry_root, ready_timeout=900, CULIGN_MODEL=QWEN, CULIGN_ENGINE=engine,
               CULIGN_MAX_ROWS=2) as srv:
        models = httpx.get(f"{srv.url}/v1/models", timeout=60).json()
        assert models["engine"]["name"] == engine
        assert "US" in {m["id"] for m in models["data"]}
        answers = {}
        for region in ("US", None):
            headers = {"X-Culign-Region": region} if region else {}
            body = {"max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "What matters most at work?"}]}
            r = httpx.post(f"{srv.url}/v1/chat/completions", headers=headers, timeout=300, json=body)
            assert r.status_code == 200, r.text
            answers[region] = r.json()["choices"][0]["message"]["content"]
            assert answers[region].strip()
        assert QWEN in srv.log()
        # its own 32,768-token context is bounded by CULIGN_MAX_CONTEXT (8192), the room vLLM sized its cache for
        long = {"max_tokens": 2, "messages": [{"role": "user", "content": "hello " * 9000}]}
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json=long)
        assert r.status_code == 413 and "context is 8192" in r.text, r.text
