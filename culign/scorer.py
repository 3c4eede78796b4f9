"""Survey scoring on a model: many candidate soft prompts x 24 items x presentations, in batched forward passes.

Glue between the instrument (``survey``) and the model (``culign.model``): tokenises every item of every presentation
once, splits off the token prefix all items share (system turn and chat header: run once per candidate, its KV
cache reused by the 24 items) and the prefix each stem/scale group shares, and turns option-token probabilities
into expected answers per item. What those answers mean (indices, losses) is ``evaluation``'s business.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import defaults
from .model import scoring
from .model.hardware import cpu_capability
from .model.runtime import Runtime
from .model.scoring import DEFAULT_BLOCK
from .survey import ANSWERS, Presentation, Survey


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
    continuations: list[list[list[int]]] | None = None  # label read-out: per suffix, the 5 labels' token ids


@dataclass(frozen=True)
class PreparedPresentation:
    presentation: Presentation
    shared: list[int]  # the prefix every item shares (system turn, chat header): once per candidate
    groups: list[_Group]  # prefixes below are relative to ``shared``
    answer_of_digit: torch.Tensor  # [5] answer value (1..5) meant by option 1..5 (symbol, or label continuation)
    option_ids: list[int] | None = None  # digit read-out: the token ids of the five option symbols (digits or letters)

    @property
    def readout(self) -> str:
        return self.presentation.readout

    @property
    def tokens(self) -> int:
        """Real tokens one candidate costs on this presentation (virtual tokens and padding not counted; the label
        read-out's continuations counted)."""
        return len(self.shared) + sum(len(g.prefix) + sum(len(s) for s in g.suffixes)
                                      + sum(len(c) for cs in (g.continuations or []) for c in cs)
                                      for g in self.groups)


@dataclass(frozen=True)
class Answers:
    """A presentation's answers for S candidates: expected answer per item on the 1..5 scale, and option mass."""
    expected: torch.Tensor  # [S, Q]
    mass: torch.Tensor  # [S, Q]: probability on the options (digit read-out: on the five symbol tokens; label
    # read-out: of the five label texts as the whole continuation); the rest went to other tokens


class SurveyScorer:
    """Scores soft prompts on a survey under one or more presentations (optionally with a persona line).

    The bare model's answers (no soft prompt: the naive and persona baselines) depend only on the model, the
    tokens and the machine, so they are kept on disk (``answer_cache``, default ``~/.cache/culign/answers``;
    ``CULIGN_ANSWER_CACHE=0`` turns it off): every later run and `culign eval` reads them instead of re-scoring.
    """

    def __init__(self, runtime: Runtime, survey: Survey, presentations: Sequence[str | Presentation],
                 persona: str | None = None, block: int | None = None, answer_cache: Path | None = None):
        self.runtime, self.survey, self.persona = runtime, survey, persona
        settings = defaults.resolve()
        if answer_cache is None and settings.answer_cache:
            answer_cache = settings.cache / "answers"
        self.answer_cache = answer_cache
        # candidates per forward: 8 was the fastest on SmolLM2 / 2 cores; a last, shorter block runs as it is
        self.block = block or settings.score_block or DEFAULT_BLOCK
        self.option_ids = runtime.option_token_ids([str(d) for d in ANSWERS])
        self._symbol_ids: dict[tuple[str, ...], list[int]] = {}
        self.prepared: dict[str, PreparedPresentation] = {}
        for p in presentations:
            pres = survey.presentation(p) if isinstance(p, str) else p
            if pres.name not in self.prepared:
                self.prepared[pres.name] = self._prepare(pres)

    def _option_ids(self, pres: Presentation) -> list[int]:
        symbols = pres.template.option_symbols
        if symbols not in self._symbol_ids:
            self._symbol_ids[symbols] = self.runtime.option_token_ids(list(symbols))
        return self._symbol_ids[symbols]

    def _prepare(self, pres: Presentation) -> PreparedPresentation:
        items = self.survey.items
        label = pres.readout == "label"
        tok = self.runtime.tokenizer
        conts = [[tok(pres.continuation(item.id, a), add_special_tokens=False)["input_ids"] for a in ANSWERS]
                 for item in items] if label else None
        ids = [self.runtime.chat_ids(pres.messages(item.id, self.persona), pres.prefill) for item in items]
        by_key: dict[tuple, list[int]] = {}
        for pos, item in enumerate(items):
            worded = pres.item(item.id)
            by_key.setdefault((worded.stem, tuple(sorted(worded.scale.items()))), []).append(pos)
        shared = _common_prefix_len(ids)
        groups, singles = [], []
        for positions in by_key.values():
            if len(positions) == 1:
                singles.append(positions[0])
                continue
            k = _common_prefix_len([ids[i] for i in positions])
            groups.append(_Group(positions, ids[positions[0]][shared:k], [ids[i][k:] for i in positions],
                                 [conts[i] for i in positions] if label else None))
        if singles:  # items alone with their stem and scale share nothing below `shared`: one forward for all of them
            groups.append(_Group(singles, [], [ids[i][shared:] for i in singles],
                                 [conts[i] for i in singles] if label else None))
        if label:  # continuation k is the label of answer k, whatever order the options were listed in
            answers = torch.tensor([float(a) for a in ANSWERS])
        else:
            answers = torch.tensor([float(pres.digit_to_answer(d)) for d in ANSWERS])
        return PreparedPresentation(pres, ids[0][:shared], groups, answers,
                                    None if label else self._option_ids(pres))

    @property
    def names(self) -> list[str]:
        return list(self.prepared)

    def tokens(self, name: str) -> int:
        return self.prepared[name].tokens

    def answers(self, soft_prompts: torch.Tensor | None, names: Sequence[str] | None = None) -> dict[str, Answers]:
        """Per presentation (all, or ``names``): the answers of each soft prompt (``[S, n, hidden]``; None: the bare
        model, S = 1)."""
        out = {}
        for name in names if names is not None else self.prepared:
            p = self.prepared[name]
            cached = self._cached(p) if soft_prompts is None else None
            if cached is not None:
                out[name] = cached
                continue
            if p.readout == "label":
                parts = scoring.continuation_logprobs(
                    self.runtime, p.shared, [(g.prefix, g.suffixes, g.continuations) for g in p.groups],
                    soft_prompts, block=self.block)
            else:
                parts = scoring.option_logprobs(self.runtime, p.shared, [(g.prefix, g.suffixes) for g in p.groups],
                                                soft_prompts, p.option_ids, block=self.block)
            logp = torch.empty(parts[0].shape[0], len(self.survey.items), len(ANSWERS))
            for g, part in zip(p.groups, parts):
                logp[:, g.positions] = part.cpu()
            if p.readout == "label":  # sums of many log-probs: normalised in log space (exp alone may underflow)
                mass = logp.logsumexp(-1).exp()
                out[name] = Answers(logp.softmax(-1) @ p.answer_of_digit, mass)
            else:
                probs = logp.exp()
                mass = probs.sum(-1)
                out[name] = Answers((probs / mass.unsqueeze(-1)) @ p.answer_of_digit, mass)
            if soft_prompts is None:
                self._store(p, out[name])
        return out

    # ------------------------------------------------------------------ the bare model's answers, on disk
    def _cache_file(self, p: PreparedPresentation) -> Path | None:
        if self.answer_cache is None:
            return None
        rt = self.runtime
        key = json.dumps([rt.fingerprint, str(rt.dtype), rt.fp32_answer, rt.device.type, cpu_capability(),
                          torch.__version__,
                          p.shared, [(g.positions, g.prefix, g.suffixes) for g in p.groups], self.option_ids,
                          p.answer_of_digit.tolist()]
                         + ([] if p.readout == "digit" and p.option_ids == self.option_ids
                            else [p.readout, p.option_ids, [g.continuations for g in p.groups]]))
        return self.answer_cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def _cached(self, p: PreparedPresentation) -> Answers | None:
        path = self._cache_file(p)
        try:
            d = json.loads(path.read_text()) if path else None
            return None if d is None else Answers(torch.tensor(d["expected"]), torch.tensor(d["mass"]))
        except (OSError, ValueError, KeyError):
            return None  # absent or unreadable: score it (and rewrite it)

    def _store(self, p: PreparedPresentation, a: Answers) -> None:
        path = self._cache_file(p)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"expected": a.expected.tolist(), "mass": a.mass.tolist()}))
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except OSError:
            pass  # a read-only cache only costs speed
