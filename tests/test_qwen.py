"""The second embedded model, Qwen2.5-Coder-1.5B-Instruct, where SmolLM2 goes: loaded by its embedded name (from the
extra culign[qwen], converted once), scored on both read-outs, moved by a soft prompt of its own width. Skipped
only where the extra is not installed; `make setup` installs it, so CI runs these."""
from __future__ import annotations

import math

import pytest
import torch

from culign import api
from culign.evaluation import Evaluator, Respondent
from culign.model import Runtime
from culign.model.embedded import installed, lookup
from culign.survey import Split, Survey

QWEN = "embedded:Qwen2.5-Coder-1.5B-Instruct"


def qwen_installed() -> bool:
    return installed(lookup(QWEN))


pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not qwen_installed(), reason="culign[qwen] is not installed (make setup installs it)")]


@pytest.fixture(scope="module")
def qwen() -> Runtime:
    return Runtime.load(QWEN, scoring=True)  # float32, as eval and train score


def test_it_loads_by_its_embedded_name(qwen):
    assert qwen.name == QWEN and qwen.dtype == torch.float32
    config = qwen.model.config
    assert config.model_type == "qwen2" and config.hidden_size == 1536 and config.num_hidden_layers == 28
    assert qwen.hidden_size == 1536 and qwen.tokenizer.chat_template
    assert qwen.fingerprint.startswith("sha256:")


@pytest.mark.parametrize("readout,presentation", [("digit", "vsm/chat/asc"), ("label", "vsm/label_chat/asc")])
def test_it_answers_the_survey_on_both_read_outs(qwen, readout, presentation):
    result = api.evaluate("US", model=qwen, presentations=[presentation], readout=readout)
    score = result.comparison.naive.scores[presentation]
    assert all(math.isfinite(v) for v in score.indices.values()) and len(score.indices) == 6
    assert len(score.item_means) == 24 and all(1 <= m <= 5 for m in score.item_means.values())
    # the probability on the options: ~1.0 on digits, ~0.78 on labels (its measured validity run, docs/results.md)
    assert score.option_mass > 0.5, score.option_mass


def test_a_soft_prompt_of_its_width_moves_its_answers(qwen):
    survey = Survey.load()
    name = "vsm/label_chat/asc"
    evaluator = Evaluator(qwen, survey, api.region("US"), Split(train=(name,)))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(8, qwen.hidden_size, generator=g) * qwen.embedding_matrix.float().std()
    naive = evaluator.evaluate(Respondent.naive()).scores[name]
    steered = evaluator.evaluate(Respondent("random", prompt)).scores[name]
    moved = max(abs(steered.indices[d] - naive.indices[d]) for d in naive.indices)
    assert moved > 0.5, (naive.indices, steered.indices)
