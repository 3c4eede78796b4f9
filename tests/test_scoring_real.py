"""Scoring on the real embedded SmolLM2: float32 by default, smooth in the prompt, and independent of the batch."""
import pytest
import torch

from culign.runtime import Runtime
from culign.scorer import SurveyScorer
from culign.survey import Survey

pytestmark = pytest.mark.real


def _prompts(rt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, rt.hidden_size, generator=g) * float(rt.embedding_matrix.float().std())


def _expected(scorer, prompts):
    return scorer.answer_probs(prompts)["standard"][0]


def test_scoring_is_float32_and_smooth_in_the_prompt(real_runtime):
    """DE needs a loss that moves little when the prompt moves little: float32 scoring does that."""
    rt = real_runtime
    assert rt.dtype == torch.float32
    scorer = SurveyScorer(rt, Survey.load(), ["standard"], block=4)
    p = _prompts(rt, 1)
    nudged = torch.cat([p, p * (1 + 1e-4)])  # 0.01 % of the prompt
    a, b = _expected(scorer, nudged)
    assert (a - b).abs().max() < 1e-3
    far = _expected(scorer, _prompts(rt, 1, seed=1))[0]
    assert (a - far).abs().max() > 1e-2  # ...while another prompt does move the answers


def test_score_is_batch_invariant_in_bf16():
    """In bf16 another batch size rounds differently (up to ~0.2 on an expected answer); fixed-size blocks make the
    score of a prompt the same alone, in a population, at any position and beside any other prompts."""
    rt = Runtime.load(dtype="bfloat16")
    scorer = SurveyScorer(rt, Survey.load(), ["standard"], block=4)
    prompts = _prompts(rt, 6)
    population = _expected(scorer, prompts)  # 6 candidates: a full block and a padded one
    alone = torch.cat([_expected(scorer, p.unsqueeze(0)) for p in prompts[:3]])
    shuffled = _expected(scorer, prompts.flip(0)).flip(0)
    assert torch.equal(population[:3], alone)
    assert torch.equal(population, shuffled)
    assert not torch.equal(population[0], population[1])  # different prompts, different answers
