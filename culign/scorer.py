"""Survey scoring on a model: many candidate soft prompts x 24 items in batched forward passes.

Glue between the instrument (``survey``) and the model (``runtime``): tokenises every item of every presentation
once, splits off the token prefix all items share (system turn and chat header: run once per candidate, its KV
cache reused by the 24 items), and turns option-token probabilities into expected answers and indices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .runtime import DEFAULT_BLOCK, Runtime
from .survey import ANSWERS, DEFAULT_CONSTANT, Presentation, Survey, SurveyResult, get_presentation, summarize


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n - 1  # keep at least one suffix token per item: the answer is read at the suffix's last position


@dataclass(frozen=True)
class _Group:
    """Items that share a token prefix (same stem and scale): the prefix runs once per candidate for all of them."""
    positions: list[int]  # indices into survey.items
    prefix: list[int]
    suffixes: list[list[int]]


@dataclass(frozen=True)
class _Prepared:
    presentation: Presentation
    shared: list[int]  # the prefix every item shares (system turn, chat header): once per candidate
    groups: list[_Group]  # prefixes below are relative to ``shared``
    answer_of_digit: torch.Tensor  # [5] answer value (1..5) meant by option digit 1..5


class SurveyScorer:
    """Scores soft prompts on a survey under one or more presentations (optionally with a persona line)."""

    def __init__(self, runtime: Runtime, survey: Survey, presentations: Sequence[str | Presentation] = ("standard",),
                 persona: str | None = None, constants: Mapping[str, float] | float = DEFAULT_CONSTANT,
                 block: int | None = None):
        self.runtime, self.survey, self.persona, self.constants = runtime, survey, persona, constants
        # candidates per forward; fixed, so that scores do not depend on how many candidates are scored together
        self.block = block or int(os.environ.get("CULIGN_SCORE_BLOCK", DEFAULT_BLOCK))
        self.option_ids = runtime.option_token_ids([str(d) for d in ANSWERS])
        self.prepared: list[_Prepared] = []
        for p in presentations:
            pres = get_presentation(p) if isinstance(p, str) else p
            ids = [runtime.chat_ids(pres.messages(item, persona), pres.prefill) for item in survey.items]
            by_key: dict[tuple, list[int]] = {}
            for pos, item in enumerate(survey.items):
                by_key.setdefault((item.stem, tuple(sorted(item.scale.items()))), []).append(pos)
            shared = _common_prefix_len(ids)
            groups = []
            for positions in by_key.values():
                k = _common_prefix_len([ids[i] for i in positions])
                groups.append(_Group(positions, ids[positions[0]][shared:k], [ids[i][k:] for i in positions]))
            answers = torch.tensor([float(pres.digit_to_answer(d)) for d in ANSWERS])
            self.prepared.append(_Prepared(pres, ids[0][:shared], groups, answers))

    @property
    def tokens_per_candidate(self) -> int:
        """Tokens one candidate costs across presentations (each shared prefix counted once)."""
        return sum(len(p.shared) + sum(len(g.prefix) + sum(len(s) for s in g.suffixes) for g in p.groups)
                   for p in self.prepared)

    def answer_probs(self, soft_prompts: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per presentation: (expected answer [S, Q] on the 1..5 scale, option mass [S, Q])."""
        out = {}
        for p in self.prepared:
            parts = self.runtime.option_logprobs(p.shared, [(g.prefix, g.suffixes) for g in p.groups],
                                                 soft_prompts, self.option_ids, block=self.block)
            logp = torch.empty(parts[0].shape[0], len(self.survey.items), len(self.option_ids))
            for g, part in zip(p.groups, parts):
                logp[:, g.positions] = part.cpu()
            probs = logp.exp()
            mass = probs.sum(-1)
            expected = (probs / mass.unsqueeze(-1)) @ p.answer_of_digit
            out[p.presentation.name] = (expected, mass)
        return out

    def score(self, soft_prompts: torch.Tensor | None) -> list[SurveyResult]:
        """One SurveyResult per soft prompt (``[S, n, hidden]``; None scores the bare model once)."""
        probs = self.answer_probs(soft_prompts)
        S = next(iter(probs.values()))[0].shape[0]
        ids = [it.id for it in self.survey.items]
        results = []
        for s in range(S):
            by_pres = {name: dict(zip(ids, exp[s].tolist())) for name, (exp, _) in probs.items()}
            mass = float(torch.stack([m[s] for _, m in probs.values()]).mean())
            results.append(summarize(self.survey, by_pres, mass, self.constants))
        return results
