"""DE over the soft-prompt space on the tiny random Llama: lowers the loss, is reproducible, resumes exactly."""
import json

import numpy as np
import pytest
import torch

from culign.optimize import Checkpoint, DEConfig, PromptSpace, initial_prompt, run_de
from culign.registry import Registry
from culign.scorer import SurveyScorer
from culign.survey import Survey
from culign.targets import resolve
from culign.trainer import TrainSettings, train

TARGET = resolve("US")


@pytest.fixture(scope="module")
def scorer(tiny_runtime):
    return SurveyScorer(tiny_runtime, Survey.load(), ["standard"])


def _space(rt, cfg):
    return PromptSpace(initial_prompt(rt, cfg, "Answer as a typical person from the United States would."), cfg,
                       float(rt.embedding_matrix.float().std()))


def _run(rt, scorer, cfg, **kw):
    return run_de(scorer, _space(rt, cfg), TARGET.scores, cfg, ref_mass=0.0, **kw)


CFG = dict(tokens=4, dim=8, popsize=8, budget=48, seed=3, scale=3.0)


def test_de_lowers_the_loss_and_is_reproducible(tiny_runtime, scorer):
    cfg = DEConfig(**CFG)
    start = scorer.score(_space(tiny_runtime, cfg).prompts(np.zeros((1, cfg.dim))))[0].loss(TARGET.scores)
    a = _run(tiny_runtime, scorer, cfg)
    assert a.loss < start
    assert a.nfev == 48 and a.generations == 5  # 8 initial + 5 generations of 8
    assert [h[0] for h in a.history] == [16, 24, 32, 40, 48]
    assert all(x[1] >= y[1] for x, y in zip(a.history, a.history[1:]))  # DE keeps its best
    b = _run(tiny_runtime, scorer, cfg)
    assert torch.equal(a.prompt, b.prompt) and a.loss == b.loss
    c = _run(tiny_runtime, scorer, DEConfig(**{**CFG, "seed": 4}))
    assert not torch.equal(a.prompt, c.prompt)


class Killed(Exception):
    """Stands in for the process dying: only what is on disk survives."""


def test_resume_after_kill_equals_uninterrupted(tiny_runtime, scorer, tmp_path):
    cfg = DEConfig(**CFG)
    full = _run(tiny_runtime, scorer, cfg)

    def die_at_gen_2(p):
        if p.generation == 2:
            raise Killed

    ck = tmp_path / "run.json"
    with pytest.raises(Killed):
        _run(tiny_runtime, scorer, cfg, checkpoint=ck, run_key="k", on_generation=die_at_gen_2)
    assert Checkpoint.load(ck).generation == 2
    resumed = _run(tiny_runtime, scorer, cfg, checkpoint=ck, resume=True, run_key="k")
    assert resumed.resumed_from == 2 and resumed.nfev == full.nfev
    assert torch.equal(resumed.prompt, full.prompt) and resumed.loss == full.loss
    assert resumed.history == full.history and resumed.seen_range == full.seen_range
    with pytest.raises(ValueError, match="different run"):
        _run(tiny_runtime, scorer, cfg, checkpoint=ck, resume=True, run_key="other")


def test_ctrl_c_keeps_the_best_so_far(tiny_runtime, scorer):
    cfg = DEConfig(**CFG)

    def interrupt(p):
        if p.generation == 2:
            raise KeyboardInterrupt

    r = _run(tiny_runtime, scorer, cfg, on_generation=interrupt)
    assert r.interrupted and r.generations == 2 and np.isfinite(r.loss)


@pytest.mark.parametrize("bad", [dict(popsize=3), dict(budget=10), dict(strategy="nope"), dict(mutation=(1.5, 0.5)),
                                 dict(recombination=2.0), dict(tokens=0), dict(init="text")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DEConfig(**bad)


def test_train_end_to_end_saves_a_complete_adapter(tiny_runtime, tmp_path):
    reg = Registry(tmp_path / "adapters")
    settings = TrainSettings(de=DEConfig(**CFG), train_presentations=["standard"],
                             heldout_presentations=["reversed"])
    out = train(tiny_runtime, TARGET, settings, reg, checkpoint_dir=tmp_path / "runs", progress=False,
                echo=lambda m: None)
    assert out.adapter.ref == "US@1"
    files = {p.name for p in out.adapter.path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "culign.json", "report.json", "radar.png",
            "loss.png"} <= files
    seen = out.report["index_range_seen"]
    assert set(seen) == {"PDI", "IDV", "MAS", "UAI", "LTO", "IVR"}
    de_indices = out.report["rows"]["de"]["indices"]
    assert all(seen[d][0] <= de_indices[d] <= seen[d][1] for d in seen)  # the best prompt was among those seen
    assert "DE reached" in out.table
    prov = json.loads((out.adapter.path / "culign.json").read_text())
    for key in ("base_model", "base_fingerprint", "target", "seed", "de", "culign_version", "weights_sha256",
                "loss", "heldout_loss", "naive_loss", "icl_loss", "option_mass", "evaluations"):
        assert key in prov, key
    assert prov["loss"] <= prov["naive_loss"] + 1e-9 or prov["de"]["init"] == "persona"
    assert set(out.report["rows"]) == {"naive", "icl", "de"}
    assert out.report["rows"]["de"]["heldout_loss"] is not None
    for png in ("radar.png", "loss.png"):
        assert (out.adapter.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = reg.load("US", hidden_size=tiny_runtime.hidden_size, base_fingerprint=tiny_runtime.fingerprint)
    assert loaded.prompt.shape == (4, tiny_runtime.hidden_size) and loaded.provenance["loss"] == out.report["loss"]
    assert "de" in out.table and "naive" in out.table
    assert not list((tmp_path / "runs").glob("*.json"))  # finished runs leave no checkpoint


def test_prompt_of_a_z_does_not_depend_on_its_batch(tiny_runtime):
    """The prompt DE saves (one z) must be bit for bit the prompt it scored (a population of z)."""
    cfg = DEConfig(**{**CFG, "dim": 64, "tokens": 8})
    space = _space(tiny_runtime, cfg)
    z = np.random.default_rng(0).uniform(-1, 1, size=(16, cfg.dim))
    together = space.prompts(z)
    assert all(torch.equal(together[i], space.prompts(z[i])[0]) for i in range(16))
