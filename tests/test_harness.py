"""culign's survey inside EleutherAI's lm-evaluation-harness (culign/harness): the harness's own log-likelihood
scoring of the task, on the embedded SmolLM2 with a committed PEFT adapter, gives the indices `culign eval` gives on
the same presentation with the digit read-out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from culign.harness import TASK_DIR  # noqa: E402
from culign.registry import Registry  # noqa: E402
from culign.model import embedded_model_dir  # noqa: E402
from culign.scorer import SurveyScorer  # noqa: E402
from culign.survey import DEFAULT_CONSTANT, DIMENSIONS, Survey, l1_loss  # noqa: E402
from culign.targets import resolve  # noqa: E402
from reliability.harness import REPO  # noqa: E402

pytestmark = pytest.mark.real
TOLERANCE = 0.01  # index points: both are float32 forwards of the same tokens, batched and padded differently
ADAPTER = REPO / "adapters" / "US" / "2"


def culign_indices(rt, presentation: str, adapter=True) -> dict[str, float]:
    survey = Survey.load()
    prompt = Registry(REPO / "adapters").load("US", 2).prompt[None] if adapter else None
    answers = SurveyScorer(rt, survey, [presentation], answer_cache=None).answers(prompt)[presentation]
    means = {item.id: float(answers.expected[0, q]) for q, item in enumerate(survey.items)}
    return survey.indices(means, DEFAULT_CONSTANT)


def harness(presentations: list[str], peft: bool = True) -> dict[str, dict]:
    """The harness's Python API (one model load, one evaluation per presentation)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(embedded_model_dir()), peft=str(ADAPTER) if peft else None, dtype="float32",
                 device="cpu", batch_size=8)
    out = {}
    for p in presentations:
        tm = TaskManager(include_path=str(TASK_DIR), metadata={"presentation": p, "region": "US"})
        res = simple_evaluate(model=model, tasks=["culign_vsm"], task_manager=tm, apply_chat_template=True)
        out[p] = {k.split(",")[0]: v for k, v in res["results"]["culign_vsm"].items() if "," in k}
    return out


def test_harness_agrees_with_culign_eval(real_runtime):
    # a reversed scale (the digit->answer mapping) and a prefill that ends without a space ("My choice: (")
    presentations = ["vsm/chat/desc", "plain/inline/asc"]
    got = harness(presentations)
    target = resolve("US").scores
    for p in presentations:
        want = culign_indices(real_runtime, p)
        for d in DIMENSIONS:
            assert abs(got[p][d] - want[d]) < TOLERANCE, (p, d, got[p][d], want[d])
        assert abs(got[p]["l1"] - l1_loss(want, target)) < TOLERANCE


def test_the_documented_command_line(real_runtime, tmp_path):
    """`lm_eval run --model hf --model_args pretrained=<embedded folder>,peft=adapters/US/2 ...` as docs/python.md
    shows it, against culign on vsm/chat/asc."""
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={embedded_model_dir()},peft={ADAPTER},dtype=float32", "--include_path",
           subprocess.run([sys.executable, "-m", "culign.harness"], capture_output=True, text=True).stdout.strip(),
           "--tasks", "culign_vsm", "--apply_chat_template", "--device", "cpu", "--batch_size", "8", "--metadata",
           json.dumps({"presentation": "vsm/chat/asc", "region": "US"}), "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["culign_vsm"]
    want = culign_indices(real_runtime, "vsm/chat/asc")
    for d in DIMENSIONS:
        assert abs(results[f"{d},none"] - want[d]) < TOLERANCE, (d, results[f"{d},none"], want[d])


def test_the_task_documents():
    from culign.harness.utils import survey_docs

    docs = survey_docs(presentation="formal/chat/desc", region="CN")["test"]
    assert len(docs) == 24 and docs[0]["region"] == "CN" and docs[0]["choices"] == [" 1", " 2", " 3", " 4", " 5"]
    assert docs[0]["answers"] == [5, 4, 3, 2, 1]  # reversed: digit 1 means answer 5
    assert docs[0]["gen_prefix"] == "Answer:"
