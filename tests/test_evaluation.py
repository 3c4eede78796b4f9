"""The one evaluation path: robust aggregates, the per-presentation mass guard, held-out families, gain kept and the
noise band (arithmetic on hand-made scores), and evaluate() on the tiny model."""
import statistics

import pytest
import torch

from culign.evaluation import (Comparison, Evaluation, Evaluator, MassGuard, PresentationScore, Respondent, Robust,
                               family_mean, order_slope)
from culign.model import scoring
from culign.report import format_table
from culign.scorer import SurveyScorer
from culign.survey import DIMENSIONS, Split, Survey
from culign.targets import parse_custom

TARGET = parse_custom("PDI=60,IDV=40", "t")


def _score(name, pdi, idv=40.0, mass=0.9):
    ind = {d: 50.0 for d in DIMENSIONS}
    ind.update(PDI=pdi, IDV=idv)
    loss = (abs(pdi - 60) + abs(idv - 40)) / 2
    return PresentationScore(name, ind, loss, mass, 0.5)


def test_robust_aggregates():
    losses = [1.0, 2.0, 6.0]
    assert Robust.parse("mean")(losses) == pytest.approx(3.0)
    assert Robust.parse("worst")(losses) == 6.0
    r = Robust.parse("mean+1.5std")
    assert (r.kind, r.k) == ("meanstd", 1.5) and str(r) == "mean+1.5std"
    assert r(losses) == pytest.approx(3.0 + 1.5 * statistics.pstdev(losses))
    assert Robust.parse("mean+2std")([4.0]) == 4.0  # one presentation: no spread
    for bad in ("median", "mean+std", "max"):
        with pytest.raises(ValueError, match="robust aggregate"):
            Robust.parse(bad)


def test_mass_guard_is_per_presentation():
    guard = MassGuard({"a": 0.9, "b": 0.5}, floor=0.9, weight=100.0)
    # 0.6 is fine on b (floor 0.45) but short on a (floor 0.81) by 0.21
    assert guard.penalty(_score("b", 60, mass=0.6)) == 0.0
    assert guard.penalty(_score("a", 60, mass=0.6)) == pytest.approx(21.0)
    assert guard.loss(_score("a", 70, mass=0.6)) == pytest.approx(5.0 + 21.0)


def _evaluation(label, values):
    split = Split(("t1", "t2"), {"v": ("v1",)}, {"fam1": ("h1", "h2", "h3"), "fam2": ("h4",)})
    return Evaluation(label, TARGET, split, {n: _score(n, v) for n, v in values.items()})


def test_heldout_is_the_mean_of_family_means():
    e = _evaluation("x", {"t1": 60, "t2": 70, "v1": 64, "h1": 62, "h2": 62, "h3": 62, "h4": 80})
    assert e.train_loss == pytest.approx((0 + 5) / 2)
    assert e.validation_loss == pytest.approx(2.0)
    assert e.heldout_by_family == {"fam1": pytest.approx(1.0), "fam2": pytest.approx(10.0)}
    assert e.heldout_loss == pytest.approx(5.5)  # not (1+1+1+10)/4: a big family does not outvote a small one
    assert e.heldout_indices["PDI"] == pytest.approx((62 + 80) / 2)
    assert family_mean(e.scores, {"none": ("zz",)}) == (None, {})


def test_gain_kept_and_significance():
    naive = _evaluation("naive", {"t1": 80, "t2": 80, "v1": 80, "h1": 80, "h2": 76, "h3": 84, "h4": 80})
    adapter = _evaluation("a", {"t1": 70, "t2": 70, "v1": 72, "h1": 75, "h2": 75, "h3": 75, "h4": 75})
    c = Comparison(TARGET, naive.split, [naive, adapter])
    # train gain 10 - 5 = 5 L1; held-out gain 10 - 7.5 = 2.5: half of it kept
    assert c.gain_kept(adapter) == pytest.approx(0.5)
    assert c.gain_kept(naive) is None  # no training gain to keep
    band = c.noise_band()
    assert band["PDI"] == pytest.approx(statistics.pstdev([80, 80, 80, 80, 76, 84, 80]))
    sig = c.significance(adapter)
    assert sig["PDI"]["gain"] == pytest.approx(5.0) and sig["PDI"]["significant"]
    assert sig["L1"]["gain"] == pytest.approx(2.5)
    worse = _evaluation("w", {"t1": 60, "t2": 60, "v1": 80, "h1": 80, "h2": 80, "h3": 80, "h4": 81})
    assert Comparison(TARGET, naive.split, [naive, worse]).gain_kept(worse) < 0  # fitted training, lost held-out
    # per family: fam1 L1 (10 + 8 + 12) / 3 = 10 -> 7.5 and fam2 10 -> 7.5, each 2.5 of the 5 trained
    assert c.gain_kept_by_family(adapter) == {"fam1": pytest.approx(0.5), "fam2": pytest.approx(0.5)}
    assert c.gain_kept_by_family(naive) == {}
    d = c.to_dict()
    assert d["rows"]["a"]["gain_kept"] == pytest.approx(0.5) and "noise_band" in d
    assert d["rows"]["a"]["gain_kept_by_family"]["fam2"] == pytest.approx(0.5)
    assert "a gain kept per held-out family: fam1 50%, fam2 50%" in format_table(c)


def test_order_slope_tells_label_following_from_digit_following():
    split = Split(("w/t/asc", "w/u/asc"), {}, {"order:desc": ("w/t/desc", "w/u/desc")})
    naive_pdi = {"w/t/asc": 70, "w/u/asc": 66, "w/t/desc": 34, "w/u/desc": 38}

    def row(label, moves):
        return Evaluation(label, TARGET, split, {n: _score(n, naive_pdi[n] + moves[n], idv=40 + moves[n] / 2)
                                                 for n in naive_pdi})
    naive = row("naive", dict.fromkeys(naive_pdi, 0.0))
    # moves the meaning: the same index change whatever the order
    meaning = row("meaning", {"w/t/asc": -6, "w/u/asc": -4, "w/t/desc": -6, "w/u/desc": -4})
    # moves the digit: the reversed scale turns every move around
    digit = row("digit", {"w/t/asc": -6, "w/u/asc": -4, "w/t/desc": 6, "w/u/desc": 4})
    half = row("half", {"w/t/asc": -6, "w/u/asc": -4, "w/t/desc": 3, "w/u/desc": 2})
    assert order_slope(meaning.scores, naive.scores) == pytest.approx(1.0)
    assert order_slope(digit.scores, naive.scores) == pytest.approx(-1.0)
    assert order_slope(half.scores, naive.scores) == pytest.approx(-0.5)
    assert order_slope(naive.scores, naive.scores) is None  # no move at all: nothing to follow
    no_pairs = {n: s for n, s in digit.scores.items() if n.endswith("/asc")}
    assert order_slope(no_pairs, naive.scores) is None
    c = Comparison(TARGET, split, [naive, meaning, digit])
    assert c.to_dict()["rows"]["digit"]["order_slope"] == pytest.approx(-1.0)
    table = format_table(c)
    assert "digit order slope -1.00" in table and "not what the answers mean" in table
    assert "meaning order slope +1.00" in table and "follow the answer labels" in table


def test_evaluate_on_the_tiny_model(word_runtime):
    survey = Survey.load()
    split = Split(("vsm/chat/asc", "terse/form/asc"), {}, {"order:desc": ("vsm/chat/desc",)})
    ev = Evaluator(word_runtime, survey, TARGET, split)
    naive = ev.evaluate(Respondent.naive())
    persona = ev.evaluate(Respondent.with_persona("China"))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(4, word_runtime.hidden_size, generator=g)
    soft = ev.evaluate(Respondent("p", prompt))
    assert set(naive.scores) == set(split.all_names)
    assert naive.scores["vsm/chat/asc"].indices != soft.scores["vsm/chat/asc"].indices
    assert persona.extra["persona"].endswith("from China would.")
    # a soft prompt scored alone gives the same numbers every time (the report and `culign eval` agree)
    again = ev.evaluate(Respondent("p", prompt))
    assert again.scores == soft.scores
    assert ev.scorer(None) is ev.scorer(None)  # one scorer per persona, built once


def test_bare_model_answers_are_cached_on_disk(word_runtime, tmp_path, monkeypatch):
    survey = Survey.load()
    cold = SurveyScorer(word_runtime, survey, ["terse/form/asc"], answer_cache=tmp_path)
    first = cold.answers(None)["terse/form/asc"]
    assert len(list(tmp_path.glob("*.json"))) == 1
    warm = SurveyScorer(word_runtime, survey, ["terse/form/asc"], answer_cache=tmp_path)
    monkeypatch.setattr(scoring, "option_logprobs", lambda *a, **k: pytest.fail("scored again"))
    again = warm.answers(None)["terse/form/asc"]
    assert torch.equal(first.expected, again.expected) and torch.equal(first.mass, again.mass)
    persona = SurveyScorer(word_runtime, survey, ["terse/form/asc"], persona="Chile", answer_cache=tmp_path)
    with pytest.raises(pytest.fail.Exception):  # other tokens, another entry: not served from the cache
        persona.answers(None)
