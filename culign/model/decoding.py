"""Generation: rows with different soft prompts (or none) decoded together, one forward per step for all rows.

Two ways to drive it: :func:`generate_stream` decodes a fixed batch to its end (the static batcher, and
:func:`generate`); :func:`prefill` and :func:`decode_step` on a :class:`DecodeBatch` let rows join and leave between
steps (the continuous scheduler). Both pick tokens with :func:`next_token` and end a row by :func:`finished`, the
one stop rule, which the serving engines' jobs apply too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from .runtime import Runtime

GREEDY_BELOW = 1e-6  # a sampling temperature under this decodes greedily (see pick)


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


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens, best first


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


# ---------------------------------------------------------------------- choosing a row's next token
def sampler(runtime: Runtime, request: GenerationRequest) -> torch.Generator | None:
    """The row's own random stream (seeded when the request gives a seed); None for greedy rows."""
    if request.temperature < GREEDY_BELOW:
        return None
    g = torch.Generator(device=runtime.device)
    g.manual_seed(request.seed if request.seed is not None else torch.seed())
    return g


def pick(logits: torch.Tensor, request: GenerationRequest, gen: torch.Generator | None) -> int:
    """The next token of one row from its logits: greedy, or sampled with temperature and top-p."""
    if request.temperature < GREEDY_BELOW:
        # 0 is greedy; so is any temperature this small (1e-300 is 0 in float32: 0 / 0 = NaN). Above it the
        # shift below keeps the division finite.
        return int(logits.argmax())
    # shifted by the max first: a small temperature then tends to greedy instead of inf / inf = NaN
    probs = ((logits - logits.max()) / request.temperature).softmax(-1)
    if request.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < request.top_p
        keep[0] = True  # top_p = 0 (the OpenAI range allows it) keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen).item())


def next_token(logits: torch.Tensor, request: GenerationRequest, gen: torch.Generator | None) -> Token:
    """A row's next token from its logits [vocab], with its logprobs when the request asked for them."""
    tok = pick(logits, request, gen)
    if request.top_logprobs is None:
        return Token(tok)
    logp = logits.float().log_softmax(-1)
    top = ()
    if request.top_logprobs > 0:
        values, ids = logp.topk(request.top_logprobs)
        top = tuple((int(i), float(v)) for i, v in zip(ids, values))
    return Token(tok, float(logp[tok]), top)


def finished(token_id: int, produced: int, request: GenerationRequest, stop_ids: set[int]) -> bool:
    """The one stop rule: a row ends on a stop token, or once it has produced ``max_new_tokens`` (``token_id``
    its latest, ``produced`` counting it)."""
    return token_id in stop_ids or produced >= request.max_new_tokens


# ---------------------------------------------------------------------- forwards
def decodes_incrementally(runtime: Runtime) -> bool:
    """Whether rows can join a running batch: every cache layer a plain growing one (no sliding window)."""
    from transformers import DynamicCache

    return not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=runtime.model.config).layers)


def _prefill_rows(runtime: Runtime, requests: Sequence[GenerationRequest]) -> DecodeBatch:
    """The requests' prompts (soft prompts included) through the model in one forward, left-padded."""
    from transformers import DynamicCache

    embeds, mask, positions = runtime.build_inputs([(r.input_ids, r.soft_prompt) for r in requests])
    cache = DynamicCache(config=runtime.model.config)
    logits = runtime._last_logits(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  **runtime._kv(cache), use_cache=True)
    return DecodeBatch(cache, mask, positions[:, -1:] + 1, logits)


@torch.inference_mode()
def prefill(runtime: Runtime, request: GenerationRequest) -> DecodeBatch:
    """One request's prompt (soft prompt included) through the model alone: a one-row batch ready to join
    others. Alone, so that its cache and first token are the same whoever else is being served."""
    return _prefill_rows(runtime, [request])


@torch.inference_mode()
def decode_step(runtime: Runtime, batch: DecodeBatch, tokens: Sequence[int]) -> None:
    """Feed each row its last token; ``batch.logits`` becomes the logits of the next."""
    ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=runtime.device)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
    batch.logits = runtime._last_logits(input_ids=ids, attention_mask=batch.mask, position_ids=batch.positions,
                                        **runtime._kv(batch.cache), use_cache=True)
    batch.positions = batch.positions + 1


@torch.inference_mode()
def generate_stream(runtime: Runtime, requests: Sequence[GenerationRequest]) -> Iterator[list[Token | None]]:
    """Decode a batch whose rows carry different soft prompts (or none) to its end: one forward per step for all.

    Yields, per step, the new token of each row (with its logprobs when the request asks; None once a row has
    finished). A row's greedy output is the same as when it is decoded alone.
    """
    if not requests:
        return
    batch = _prefill_rows(runtime, requests)
    gens = [sampler(runtime, r) for r in requests]
    done = [r.max_new_tokens <= 0 for r in requests]
    produced = [0] * len(requests)
    while not all(done):
        step: list[Token | None] = []
        for i, r in enumerate(requests):
            if done[i]:
                step.append(None)
                continue
            token = next_token(batch.logits[i], r, gens[i])
            produced[i] += 1
            done[i] = finished(token.id, produced[i], r, runtime.stop_ids)
            step.append(token)
        yield step
        if all(done):
            break
        decode_step(runtime, batch, [t.id if t is not None else runtime.pad_id for t in step])


def generate(runtime: Runtime, requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Token ids generated per row (stop token included when one ended the row)."""
    outs: list[list[int]] = [[] for _ in requests]
    for step in generate_stream(runtime, requests):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t.id)
    return outs
