"""Scoring on the real embedded SmolLM2: float32 by default, smooth in the prompt, and independent of the batch."""
import pytest
import torch

from culign.model import Runtime
from culign.scorer import SurveyScorer
from culign.survey import Survey

pytestmark = pytest.mark.real


def _prompts(rt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, rt.hidden_size, generator=g) * float(rt.embedding_matrix.float().std())


def _expected(scorer, prompts):
    return scorer.answers(prompts)["vsm/chat/asc"].expected


def test_scoring_is_float32_and_smooth_in_the_prompt(real_runtime):
    """The search needs a loss that moves little when the prompt moves little: float32 scoring does that."""
    rt = real_runtime
    assert rt.dtype == torch.float32
    scorer = SurveyScorer(rt, Survey.load(), ["standard"], block=4)
    p = _prompts(rt, 1)
    nudged = torch.cat([p, p * (1 + 1e-4)])  # 0.01 % of the prompt
    a, b = _expected(scorer, nudged)
    assert (a - b).abs().max() < 1e-3
    far = _expected(scorer, _prompts(rt, 1, seed=1))[0]
    assert (a - far).abs().max() > 1e-2  # ...while another prompt does move the answers


def test_a_prompt_scores_alike_alone_and_in_a_population(real_runtime):
    """Another batch size may pick other kernels: in float32 that moves an expected answer by rounding only, and
    every number culign reports is the prompt re-scored alone anyway. The size of that rounding depends on the
    CPU's kernels: up to 1.2e-5 on an expected answer on an AMX machine (0.0004 index points per unit coefficient)."""
    scorer = SurveyScorer(real_runtime, Survey.load(), ["standard"], block=4)
    prompts = _prompts(real_runtime, 5)
    population = _expected(scorer, prompts)  # a block of 4 and a block of 1
    alone = torch.cat([_expected(scorer, p.unsqueeze(0)) for p in prompts[:2]])
    torch.testing.assert_close(population[:2], alone, atol=5e-5, rtol=0)
    assert not torch.equal(population[0], population[1])  # different prompts, different answers
