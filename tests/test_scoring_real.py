"""Scoring on the real embedded SmolLM2 in bf16: a candidate's score must not depend on its batch."""
import pytest
import torch

from culign.scorer import SurveyScorer
from culign.survey import Survey

pytestmark = pytest.mark.real


def test_score_is_batch_invariant_in_bf16(real_runtime):
    """In bf16, another batch size rounds differently (up to ~0.2 on an expected answer); fixed-size blocks make the
    score of a prompt the same alone, in a population, at any position, and beside any other prompts."""
    rt = real_runtime
    assert rt.dtype == torch.bfloat16
    scorer = SurveyScorer(rt, Survey.load(), ["standard"], block=4)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(6, 3, rt.hidden_size, generator=g) * float(rt.embedding_matrix.float().std())
    population = scorer.answer_probs(prompts)["standard"][0]  # 6 candidates: a full block and a padded one
    alone = torch.cat([scorer.answer_probs(p.unsqueeze(0))["standard"][0] for p in prompts[:3]])
    shuffled = scorer.answer_probs(prompts.flip(0))["standard"][0].flip(0)
    assert torch.equal(population[:3], alone)
    assert torch.equal(population, shuffled)
    assert not torch.equal(population[0], population[1])  # different prompts, different answers
