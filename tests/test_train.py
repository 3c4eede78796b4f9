"""The search on the tiny random Llama: robust objective on presentation subsets, DE / CMA-ES / random search,
exact resume, Ctrl-C, elites and validation, and a training run end to end."""
import json

import numpy as np
import pytest
import torch

from culign.evaluation import Evaluator, MassGuard, Respondent, Robust
from culign.optimize import (Checkpoint, Optimizer, PromptSpace, RobustObjective, SearchConfig, initial_prompt,
                             run_search, subset_for)
from culign.registry import Registry
from culign.scorer import SurveyScorer
from culign.survey import Split, Survey
from culign.targets import resolve
from culign.trainer import TrainSettings, train

TARGET = resolve("US")
TRAIN = ("vsm/chat/asc", "terse/form/asc", "plain/inline/asc")
SPLIT = Split(TRAIN, {"wording:casual": ("casual/chat/asc",)},
              {"wording:formal": ("formal/chat/asc",), "order:desc": ("vsm/chat/desc",)})
CFG = dict(tokens=4, dim=8, popsize=6, budget=24, seed=3, scale=3.0, subset=2, elites=3, rotate_every=2)


@pytest.fixture(scope="module")
def survey():
    return Survey.load()


@pytest.fixture(scope="module")
def scorer(word_runtime, survey):
    return SurveyScorer(word_runtime, survey, SPLIT.all_names)


def _objective(rt, scorer, cfg, robust="mean"):
    space = PromptSpace(initial_prompt(rt, cfg, "Answer as a typical person from the United States would."), cfg,
                        float(rt.embedding_matrix.float().std()))
    guard = MassGuard({n: 0.0 for n in SPLIT.all_names})  # the tiny model's mass is tiny: no penalty here
    return RobustObjective(scorer, space, TARGET.scores, TRAIN, Robust.parse(robust), guard)


def _run(rt, scorer, cfg, **kw):
    objective = _objective(rt, scorer, cfg)
    return run_search(objective, cfg, **kw), objective


def test_subsets_are_seeded_and_cover_the_training_set():
    names = [f"p{i}" for i in range(9)]
    a = [subset_for(g, names, 2, seed=0) for g in range(30)]
    assert a == [subset_for(g, names, 2, seed=0) for g in range(30)]  # a function of (seed, generation) only
    assert all(len(s) == 2 == len(set(s)) for s in a) and set().union(*a) == set(names)
    assert a != [subset_for(g, names, 2, seed=1) for g in range(30)]
    assert subset_for(5, names, 0, seed=0) == names == subset_for(5, names, 9, seed=0)


def test_search_improves_and_depends_on_the_seed(word_runtime, scorer):
    cfg = SearchConfig(**CFG)
    a, obj = _run(word_runtime, scorer, cfg)
    assert a.nfev == 24 and a.generations == 4 and [h[0] for h in a.history] == [6, 12, 18, 24]
    assert all(x[1] >= y[1] for x, y in zip(a.history, a.history[1:]))  # the best elite never gets worse
    assert a.objective == pytest.approx(obj.value(a.z))
    assert a.history[-1][1] <= obj.value(np.zeros(cfg.dim))  # z = 0 (the persona start) is in the first population
    c, _ = _run(word_runtime, scorer, SearchConfig(**{**CFG, "seed": 4}))
    assert not torch.equal(a.prompt, c.prompt)


def test_de_selection_is_paired_and_elites_see_every_presentation(word_runtime, scorer):
    cfg = SearchConfig(**CFG)
    res, obj = _run(word_runtime, scorer, cfg, validation=["casual/chat/asc"])
    # each generation scored its candidates on 2 of the 3 training presentations; parents were re-scored on the
    # generation's subset where they had not been, and each generation's best on all 3: so far fewer than 3 per
    # candidate, more than 2
    assert 2 * res.nfev < res.presentation_evals < 3 * res.nfev + 3 * cfg.elites
    assert res.selected_by == "validation" and len(res.elites) >= 1
    assert all(set(TRAIN) <= set(obj.cache[obj.key(z)]) for z in [res.z])
    chosen_val = obj.value(res.z, ["casual/chat/asc"])
    assert chosen_val == min(e["validation"] for e in res.elites)


def test_a_kept_subset_spares_re_scoring_the_parents(word_runtime, scorer):
    # one subset for the whole run (4 generations): trials are scored on it, surviving parents already were, and
    # only a generation's best that beats the elites is scored on the other 2 presentations
    kept, _ = _run(word_runtime, scorer, SearchConfig(**{**CFG, "subset": 1, "rotate_every": 4}))
    assert kept.presentation_evals <= kept.nfev + kept.generations * (len(TRAIN) - 1)
    fresh, _ = _run(word_runtime, scorer, SearchConfig(**{**CFG, "subset": 1, "rotate_every": 1}))
    assert fresh.presentation_evals > kept.presentation_evals  # a new subset each generation re-scores parents
    with pytest.raises(ValueError, match="rotate_every"):
        SearchConfig(rotate_every=0)


def test_subset_zero_scores_every_candidate_on_every_presentation(word_runtime, scorer):
    cfg = SearchConfig(**{**CFG, "subset": 0})
    res, _ = _run(word_runtime, scorer, cfg)
    assert res.presentation_evals == res.nfev * len(TRAIN) and res.selected_by == "train"


class Killed(Exception):
    """Stands in for the process dying: only what is on disk survives."""


@pytest.mark.parametrize("optimizer", ["de", "cma", "random"])
def test_resume_after_kill_equals_uninterrupted(word_runtime, scorer, tmp_path, optimizer):
    """Also the reproducibility test: the resumed run starts from a fresh objective (no cache) and a fresh RNG."""
    cfg = SearchConfig(**CFG, optimizer=optimizer)
    full, _ = _run(word_runtime, scorer, cfg)
    assert full.nfev == 24 and full.history[-1][1] <= full.history[0][1]

    def die_at_gen_3(p):
        if p.generation == 3:
            raise Killed

    ck = tmp_path / "run.json"
    with pytest.raises(Killed):
        _run(word_runtime, scorer, cfg, checkpoint=ck, run_key="k", on_generation=die_at_gen_3)
    assert Checkpoint.load(ck).generation == 3
    resumed, _ = _run(word_runtime, scorer, cfg, checkpoint=ck, resume=True, run_key="k")  # a fresh objective
    assert resumed.resumed_from == 3 and resumed.nfev == full.nfev
    assert torch.equal(resumed.prompt, full.prompt) and resumed.objective == full.objective
    assert resumed.history == full.history and resumed.seen_range == full.seen_range
    assert resumed.presentation_evals == full.presentation_evals
    with pytest.raises(ValueError, match="different run"):
        _run(word_runtime, scorer, cfg, checkpoint=ck, resume=True, run_key="other")


def test_ctrl_c_keeps_the_best_so_far(word_runtime, scorer):
    def interrupt(p):
        if p.generation == 2:
            raise KeyboardInterrupt

    r, obj = _run(word_runtime, scorer, SearchConfig(**CFG), on_generation=interrupt)
    assert r.interrupted and r.generations == 2 and np.isfinite(r.objective)
    assert r.selected_by == "train"  # no validation pass after Ctrl-C: the user wants out


def test_time_limit_stops_at_a_generation_boundary(word_runtime, scorer):
    """--max-minutes: a generation that would end past the limit is not started; the result is a normal one."""
    cfg = SearchConfig(**{**CFG, "budget": 600, "max_seconds": 1e-6})
    r, _ = _run(word_runtime, scorer, cfg)
    assert r.stopped_by == "time" and r.generations == 1 and r.nfev == cfg.popsize and not r.interrupted
    full, _ = _run(word_runtime, scorer, SearchConfig(**CFG))
    assert full.stopped_by == "budget" and full.nfev == CFG["budget"]
    assert SearchConfig(**CFG).run_key() == cfg.run_key()  # a resume may change the limit, like the budget
    with pytest.raises(ValueError, match="max_seconds"):
        SearchConfig(**{**CFG, "max_seconds": 0})


def test_robust_worst_is_the_max_over_the_subset(word_runtime, scorer):
    cfg = SearchConfig(**CFG)
    mean, worst = _objective(word_runtime, scorer, cfg), _objective(word_runtime, scorer, cfg, "worst")
    z = np.full((1, cfg.dim), 0.3)
    per = [mean.guard.loss(s) for s in mean.scores(z, TRAIN)[0].values()]
    assert mean.losses(z, TRAIN)[0] == pytest.approx(np.mean(per))
    assert worst.losses(z, TRAIN)[0] == pytest.approx(max(per))


@pytest.mark.parametrize("bad", [dict(popsize=3), dict(budget=10), dict(strategy="nope"), dict(mutation=(1.5, 0.5)),
                                 dict(recombination=2.0), dict(tokens=0), dict(init="text"), dict(subset=-1),
                                 dict(robust="median"), dict(optimizer="sgd"), dict(elites=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SearchConfig(**bad)


def test_train_end_to_end_saves_a_complete_adapter(word_runtime, survey, tmp_path):
    reg = Registry(tmp_path / "adapters")
    settings = TrainSettings(search=SearchConfig(**CFG), split=SPLIT)
    out = train(word_runtime, survey, TARGET, settings, reg, checkpoint_dir=tmp_path / "runs", progress=False,
                echo=lambda m: None)
    assert out.adapter.ref == "US@1"
    files = {p.name for p in out.adapter.path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "culign.json", "report.json", "radar.png",
            "loss.png"} <= files
    seen = out.report["index_range_seen"]
    assert set(seen) == {"PDI", "IDV", "MAS", "UAI", "LTO", "IVR"}
    prov = json.loads((out.adapter.path / "culign.json").read_text())
    for key in ("base_model", "base_fingerprint", "target", "seed", "search", "culign_version", "weights_sha256",
                "loss", "heldout_loss", "gain_kept", "naive_loss", "icl_loss", "option_mass", "evaluations",
                "split", "robust", "optimizer", "presentation_evaluations"):
        assert key in prov, key
    assert prov["split"] == SPLIT.to_dict() and prov["train_presentations"] == list(TRAIN)
    assert set(out.report["rows"]) == {"naive", "persona", "adapter"}
    assert set(out.report["rows"]["adapter"]["heldout_by_family"]) == {"wording:formal", "order:desc"}
    assert "noise_band" in out.report and "gain kept" in out.table.replace("kept = gain kept", "gain kept")
    for png in ("radar.png", "loss.png"):
        assert (out.adapter.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved prompt, scored alone afresh, gives exactly the reported numbers (what `culign eval` does)
    loaded = reg.load("US", hidden_size=word_runtime.hidden_size, base_fingerprint=word_runtime.fingerprint)
    again = Evaluator(word_runtime, survey, TARGET, SPLIT).evaluate(Respondent("again", loaded.prompt))
    assert again.train_loss == prov["loss"] and again.heldout_loss == prov["heldout_loss"]
    assert not list((tmp_path / "runs").glob("*.json"))  # finished runs leave no checkpoint


def test_prompt_of_a_z_does_not_depend_on_its_batch(word_runtime):
    """The prompt a search saves (one z) must be bit for bit the prompt it scored (a population of z)."""
    cfg = SearchConfig(**{**CFG, "dim": 64, "tokens": 8})
    space = PromptSpace(initial_prompt(word_runtime, cfg, "x y"), cfg, 1.0)
    z = np.random.default_rng(0).uniform(-1, 1, size=(16, cfg.dim))
    together = space.prompts(z)
    assert all(torch.equal(together[i], space.prompts(z[i])[0]) for i in range(16))


def test_optimizers_enum_matches_cli_choices():
    assert {o.value for o in Optimizer} == {"de", "cma", "random"}


def test_an_interrupted_training_saves_the_best_so_far_marked_interrupted(word_runtime, survey, tmp_path,
                                                                           monkeypatch):
    import culign.trainer as trainer

    search = trainer.run_search

    def ctrl_c_at_generation_2(*args, **kw):
        report = kw["on_generation"]

        def stop(p):
            report(p)
            if p.generation == 2:
                raise KeyboardInterrupt

        return search(*args, **{**kw, "on_generation": stop})

    monkeypatch.setattr(trainer, "run_search", ctrl_c_at_generation_2)
    reg = Registry(tmp_path / "adapters")
    out = train(word_runtime, survey, TARGET, TrainSettings(search=SearchConfig(**CFG), split=SPLIT), reg,
                checkpoint_dir=tmp_path / "runs", progress=False, echo=lambda m: None)
    assert out.report["interrupted"] and out.report["evaluations"] == 12
    info = reg.scan()[0][0]
    assert info.interrupted and info.ref == "US@1"
    assert "Interrupted run" in (out.adapter.path / "report.html").read_text()
    assert out.report["heldout_loss"] is None and out.report["train_loss"] > 0  # saved at once, held-out skipped
    assert list((tmp_path / "runs").glob("*.json"))  # the checkpoint stays: --resume continues the cut run


def test_a_time_limited_training_keeps_its_checkpoint_for_resume(word_runtime, survey, tmp_path):
    reg = Registry(tmp_path / "adapters")
    cfg = SearchConfig(**{**CFG, "budget": 600, "max_seconds": 1e-6})
    out = train(word_runtime, survey, TARGET, TrainSettings(search=cfg, split=SPLIT), reg,
                checkpoint_dir=tmp_path / "runs", progress=False, echo=lambda m: None)
    assert out.report["stopped_by"] == "time" and not out.report["interrupted"] and out.report["evaluations"] == 6
    assert out.report["heldout_loss"] is not None  # a normal result: scored everywhere
    assert list((tmp_path / "runs").glob("*.json"))  # --resume with a larger limit goes on from here


@pytest.mark.parametrize("strategy", ["best1bin", "rand1bin", "currenttobest1bin", "best2bin", "rand2bin",
                                      "randtobest1bin", "best1exp", "rand1exp"])
def test_every_de_strategy_converges_on_a_quadratic(strategy):
    """culign's DE (its own: paired selection on subsets is not scipy's) on a known bowl, no model."""
    from culign.optimize import _DE

    class Bowl:
        def losses(self, Z, subset):
            return ((np.atleast_2d(Z) - 0.5) ** 2).sum(1)

    de = _DE(SearchConfig(strategy=strategy, dim=8, popsize=12), np.random.default_rng(0))
    de.start(Bowl(), [])
    start = de.energies.min()
    for _ in range(60):
        de.step(Bowl(), [])
    assert de.energies.min() < start / 10 and np.all(np.abs(de.population) <= 1.0)
