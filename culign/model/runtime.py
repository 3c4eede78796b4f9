"""The loaded model: a frozen causal LM, its tokenizer, and what culign needs from it.

Construction prepares the model once (the answer position in float32, row-wise decode attention for batch
invariance, stop and pad ids); the methods turn chats into token ids and rows of (ids, soft prompt) into model
inputs, the soft prompt prepended as embeddings. Scoring (:mod:`.scoring`) and decoding (:mod:`.decoding`) are
functions of a Runtime. Training and serving both go through here, so a speed-up here is a speed-up everywhere.
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Sequence

import torch

from .loading import load_pretrained, weights_fingerprint

log = logging.getLogger("culign.model")

ROWWISE = "culign_rowwise_sdpa"


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
    if all(p.dtype == torch.float32 for p in module.parameters()):
        # float32 already (a bf16 search copy shares the float32 model's head, model/precision.py): no second copy
        forward = module.forward
        object.__setattr__(module, "_culign_fp32", True)
        module.forward = lambda x, *args, **kwargs: forward(x.float(), *args, **kwargs)
        return
    copy32 = copy.deepcopy(module).float()
    object.__setattr__(module, "_culign_fp32", copy32)  # outside _modules: not in state_dict(), not moved by .to()
    module.forward = lambda x, *args, **kwargs: copy32(x.float(), *args, **kwargs)


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

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
             scoring: bool = False, fp32_answer: bool | None = None,
             batch_invariant: bool | None = None) -> "Runtime":
        """Load the embedded default (model None), an HF hub id (from the local HF cache) or a local folder
        (see :func:`.loading.load_pretrained`; no environment is read: callers resolve it with culign.defaults).

        ``scoring``: the runtime is for survey scoring (eval, train), whose default dtype is float32.
        """
        loaded = load_pretrained(model, device, dtype, scoring)
        return cls(loaded.model, loaded.tokenizer, loaded.name, loaded.device, loaded.dtype, fp32_answer,
                   batch_invariant)

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

    # ------------------------------------------------------------------ injection and forwards
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

    def _embed_ids(self, ids) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long, device=self.device)) \
            .to(self.dtype)

    def _kv(self, cache) -> dict:
        """The forward keyword that passes a KV cache (its name depends on the transformers version)."""
        return {self._cache_kw: cache}
