"""The survey read-outs on a shared-prefix KV cache: many candidate soft prompts x many items in few forwards.

Every presentation is a prefix tree: ``[soft prompt][shared]`` (the trunk: system turn and chat header, once per
candidate), then each group's prefix (items sharing a stem and scale), then each item's suffix. The digit read-out
(:func:`option_logprobs`) reads the option tokens at the suffix's last position; the label read-out
(:func:`continuation_logprobs`) scores each label's text as a continuation. Both take the :class:`Runtime` first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .runtime import Runtime

# candidates per scoring forward: the fastest size measured on SmolLM2 / 2 CPU cores in float32 (1.22 candidates/s;
# 4: -11 %, 16: -6 %). A lone candidate is padded to a whole block, so a bigger block also makes baselines dearer.
DEFAULT_BLOCK = 8


def _shared_prefix_blocks(runtime: Runtime, soft_prompts: torch.Tensor | None, shared_ids: Sequence[int], block: int):
    """The scoring tree's trunk, ``block`` candidates at a time: yields (b, snapshot, P0), the keys and values
    of ``[soft prompt][shared]`` for b candidates (P0 positions), computed in one forward. Both read-outs
    branch off it, so the shared part of every presentation is paid once per block."""
    from transformers import DynamicCache

    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if soft_prompts is None:
        soft_prompts = torch.zeros(1, 0, runtime.hidden_size)
    soft_prompts = soft_prompts.to(runtime.device, runtime.dtype)
    S, n = soft_prompts.shape[:2]
    shared = runtime._embed_ids(list(shared_ids))
    P0 = n + shared.shape[0]
    for start in range(0, S, block):
        sp = soft_prompts[start:start + block]
        b = sp.shape[0]
        cache = DynamicCache(config=runtime.model.config)
        runtime.model.base_model(inputs_embeds=torch.cat([sp, shared.unsqueeze(0).expand(b, -1, -1)], dim=1),
                                 position_ids=torch.arange(P0, device=runtime.device).unsqueeze(0),
                                 **runtime._kv(cache), use_cache=True)
        yield b, [(layer.keys, layer.values) for layer in cache.layers], P0  # updates concatenate: never mutated


def _group_cache(runtime: Runtime, snapshot, prefix: torch.Tensor, b: int, P0: int):
    """A fresh cache holding the trunk's snapshot extended by a group's prefix embeddings: (cache, P), P the
    positions it now covers."""
    from transformers import DynamicCache

    cache = DynamicCache(config=runtime.model.config)
    for i, (k, v) in enumerate(snapshot):
        cache.update(k, v, i)
    P = P0 + prefix.shape[0]
    if prefix.shape[0]:
        runtime.model.base_model(inputs_embeds=prefix.unsqueeze(0).expand(b, -1, -1),
                                 position_ids=torch.arange(P0, P, device=runtime.device).unsqueeze(0),
                                 **runtime._kv(cache), use_cache=True)
    return cache, P


@torch.inference_mode()
def option_logprobs(runtime: Runtime, shared_ids: Sequence[int],
                    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
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
        lengths = torch.tensor([len(s) for s in suffixes], device=runtime.device)
        Ls = int(lengths.max())
        ids = torch.full((len(suffixes), Ls), runtime.pad_id, dtype=torch.long)
        for q, suf in enumerate(suffixes):
            ids[q, : len(suf)] = torch.tensor(list(suf), dtype=torch.long)
        prepared.append((runtime._embed_ids(list(prefix_ids)), runtime._embed_ids(ids), lengths))
    opt = torch.as_tensor(list(option_ids), device=runtime.device)
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    for b, snapshot, P0 in _shared_prefix_blocks(runtime, soft_prompts, shared_ids, block):
        for g, (prefix, suffix_emb, lengths) in enumerate(prepared):
            cache, P = _group_cache(runtime, snapshot, prefix, b, P0)
            Q, Ls = suffix_emb.shape[:2]
            cache.batch_repeat_interleave(Q)  # rows: candidate-major, Q suffixes each
            hidden = runtime.model.base_model(
                inputs_embeds=suffix_emb.repeat(b, 1, 1),
                position_ids=(P + torch.arange(Ls, device=runtime.device)).unsqueeze(0),
                **runtime._kv(cache), use_cache=True).last_hidden_state  # [b*Q, Ls, d], final norm applied
            last = hidden[torch.arange(b * Q, device=runtime.device), (lengths - 1).repeat(b)]
            logits = runtime._head(last)  # full vocab at the answer position only: ~0.4 % of the forward
            out[g].append(logits.log_softmax(-1)[:, opt].view(b, Q, len(opt)))
    return [torch.cat(parts) for parts in out]


@torch.inference_mode()
def continuation_logprobs(runtime: Runtime, shared_ids: Sequence[int],
                          groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]],
                                                 Sequence[Sequence[Sequence[int]]]]],
                          soft_prompts: torch.Tensor | None, block: int = DEFAULT_BLOCK) -> list[torch.Tensor]:
    """Label read-out: the log-likelihood of each continuation after ``[soft prompt][shared][prefix][suffix]``.

    ``groups`` is a list of (group prefix, suffixes, continuations) with ``continuations[q]`` the K token-id
    lists scored after suffix q. The result has one ``[S, Q_g, K]`` tensor (float32) per group: the sum over a
    continuation's tokens of log p(token | everything before it), each normalised over the whole vocabulary.

    The prefix tree of :func:`option_logprobs` is shared, and the continuations hang off each suffix as
    branches of a tree in the *same* forward as the suffixes: row q holds [suffix q][continuation 1]...
    [continuation K] (each continuation without its last token, which is only predicted), and a 4-D mask lets
    continuation k see the prefix cache, suffix q's real tokens and its own earlier tokens, nothing else. Each
    continuation token gets the position it has in the sequence alone, so a row's numbers are those of
    ``[..][suffix q][continuation k]`` alone (tested against one plain forward over the whole sequence), the
    five continuations cost only their own tokens, and a group still costs one forward. Candidates run
    ``block`` at a time, as in :func:`option_logprobs`.
    """
    dev = runtime.device
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
        ids = torch.full((Q, T), runtime.pad_id, dtype=torch.long)
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
        prepared.append((runtime._embed_ids(list(prefix_ids)), runtime._embed_ids(ids), rel.to(dev), local.to(dev),
                         lengths, first,
                         torch.tensor(rows, dtype=torch.long, device=dev),
                         torch.tensor(slots, dtype=torch.long, device=dev),
                         torch.tensor(targets, dtype=torch.long, device=dev),
                         torch.tensor(which, dtype=torch.long, device=dev)))
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    for b, snapshot, P0 in _shared_prefix_blocks(runtime, soft_prompts, shared_ids, block):
        for g, (prefix, tree, rel, local, lengths, first, rows, slots, targets, which) in enumerate(prepared):
            cache, P = _group_cache(runtime, snapshot, prefix, b, P0)
            Q, T = tree.shape[:2]
            cache.batch_repeat_interleave(Q)  # rows: candidate-major, Q suffixes each
            mask = torch.cat([torch.ones(b * Q, T, P, dtype=torch.bool, device=dev), local.repeat(b, 1, 1)],
                             dim=-1).unsqueeze(1)  # [rows, 1, T, P + T]: True = may attend
            hidden = runtime.model.base_model(inputs_embeds=tree.repeat(b, 1, 1), attention_mask=mask,
                                              position_ids=P + rel.repeat(b, 1), **runtime._kv(cache),
                                              use_cache=True).last_hidden_state  # [b*Q, T, d], final norm applied
            all_rows = torch.arange(b * Q, device=dev)
            scores = runtime._head(hidden[all_rows, (lengths - 1).repeat(b)]).log_softmax(-1) \
                .gather(1, first.repeat(b, 1))  # [b*Q, K]: each continuation's first token
            if len(rows):
                offset = (torch.arange(b, device=dev) * Q).repeat_interleave(len(rows))
                rr, ss = rows.repeat(b) + offset, slots.repeat(b)
                tt, kk = targets.repeat(b), which.repeat(b)
                picked = torch.empty(len(rr), device=dev)
                for c0 in range(0, len(rr), 256):  # the full-vocabulary head 256 positions at a time
                    sl = slice(c0, c0 + 256)
                    picked[sl] = runtime._head(hidden[rr[sl], ss[sl]]).log_softmax(-1) \
                        .gather(1, tt[sl].unsqueeze(1)).squeeze(1)
                scores = scores.index_put((rr, kk), picked, accumulate=True)
            out[g].append(scores.view(b, Q, -1).float())
    return [torch.cat(parts) for parts in out]
