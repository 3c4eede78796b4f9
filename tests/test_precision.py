"""Search precisions (culign.model.precision) and their fidelity check (culign.fidelity): the copies share the float32
model's tensors and leave it untouched, the check passes a faithful precision and refuses one that reorders the
candidates (a deliberately broken precision, registered like the real ones), the switch is honoured and recorded in
provenance, and a run's reported numbers are float32 whatever its search used."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from culign import api, defaults, fidelity
from culign.evaluation import Evaluator, Respondent
from culign.model import Runtime
from culign.model import precision
from culign.optimize import SearchConfig
from culign.registry import Registry
from culign.survey import Split, Survey
from culign.targets import resolve
from culign.trainer import TrainSettings, train

TARGET = resolve("US")
SPLIT = Split(("vsm/chat/asc", "plain/inline/asc"), {}, {"order:desc": ("vsm/chat/desc",)})
CFG = dict(tokens=4, dim=8, popsize=6, budget=18, seed=3, scale=3.0, subset=1, elites=2)


def _noisy(model: torch.nn.Module) -> torch.nn.Module:
    """A broken precision: the float32 model with seeded noise on the final hidden states (the answer moves at
    random, so the candidates' order is lost). Registered as a precision, it runs the real code path."""
    out = precision._shared_copy(model)
    g = torch.Generator().manual_seed(0)
    norm = getattr(getattr(out, "base_model", None), "norm", None)  # (auto's speed probe converts a bare Linear)
    if norm is not None:
        norm.register_forward_hook(lambda _m, _args, y: y + 3 * y.std() * torch.randn(y.shape, generator=g))
    return out


BROKEN = precision.Precision("noisy", _noisy, torch.float32)
FAITHFUL = precision.Precision("copy", lambda m: precision._shared_copy(m), torch.float32)  # the same numbers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one for the module: the float32 reference is scored once


@pytest.fixture
def registered(monkeypatch, cache):
    monkeypatch.setitem(precision.PRECISIONS, "noisy", BROKEN)
    monkeypatch.setitem(precision.PRECISIONS, "copy", FAITHFUL)
    monkeypatch.setenv("CULIGN_CACHE", str(cache))
    monkeypatch.setattr(fidelity, "CANDIDATES", 24)  # fewer than a run's 64, for the tests' time


@pytest.fixture(scope="module")
def survey():
    return Survey.load()


def test_search_copies_share_the_float32_tensors_and_leave_the_model_alone(tiny_model):
    model, tok = tiny_model
    rt = Runtime(model, tok, "tiny", "cpu", torch.float32)
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    before = rt.next_token_logits([(ids, None)])
    emb = rt.embedding_matrix.data_ptr()
    assert precision.search_runtime(rt, "fp32") is rt

    bf16 = precision.search_runtime(rt, "bf16")
    layer = bf16.model.model.layers[0].mlp.up_proj
    assert bf16.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert bf16.embedding_matrix.data_ptr() == emb == bf16.model.get_output_embeddings().weight.data_ptr()
    assert bf16.model.model.norm.weight.dtype == torch.float32 and bf16.fp32_answer
    bl = bf16.next_token_logits([(ids, None)])
    assert bl.dtype == torch.float32 and not torch.equal(bl, before)
    torch.testing.assert_close(bl, before, atol=0.1, rtol=0.05)

    int8 = precision.search_runtime(rt, "int8")
    assert isinstance(int8.model.model.layers[0].self_attn.q_proj, precision.Int8Linear)
    assert isinstance(int8.model.get_output_embeddings(), torch.nn.Linear)  # the head stays float32
    assert int8.embedding_matrix.data_ptr() == emb
    torch.testing.assert_close(int8.next_token_logits([(ids, None)]), before, atol=0.1, rtol=0.05)

    # the float32 runtime is untouched: same modules, same numbers; the copies are told apart by fingerprint
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert torch.equal(rt.next_token_logits([(ids, None)]), before)
    assert {bf16.fingerprint, int8.fingerprint} == {f"{rt.fingerprint}/bf16", f"{rt.fingerprint}/int8"}


def test_int8_linear_is_close_to_float32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    with torch.inference_mode():
        ref, got = lin(x), precision.Int8Linear(lin)(x)
    assert got.shape == ref.shape and (got - ref).norm() / ref.norm() < 0.02
    assert precision.linear_rate("int8", 32, 64, 64) > 0 and precision.linear_rate("bf16", 32, 64, 64) > 0


def test_the_check_passes_a_faithful_precision_and_refuses_a_reordering_one(word_runtime, survey, registered):
    cfg = SearchConfig(**CFG)
    good = fidelity.check(word_runtime, survey, "copy", SPLIT.train, cfg)
    assert good.passes and good.spearman == pytest.approx(1.0) and good.max_index_diff == 0.0
    assert good.same_best == good.targets == 8
    assert good.candidates == 24 and good.presentations == ["vsm/chat/asc"] and not good.from_cache
    again = fidelity.check(word_runtime, survey, "copy", SPLIT.train, cfg)  # the cache: no second scoring
    assert again.from_cache and again.spearman == good.spearman and again.rate == good.rate

    bad = fidelity.check(word_runtime, survey, "noisy", SPLIT.train, cfg)
    assert not bad.passes and bad.spearman < 0.5 and bad.max_index_diff > 1
    with pytest.raises(fidelity.PrecisionRefused, match="fails the fidelity check"):
        fidelity.choose(word_runtime, survey, "noisy", SPLIT.train, cfg, echo=lambda _m: None)
    forced = fidelity.choose(word_runtime, survey, "noisy", SPLIT.train, cfg, force=True, echo=lambda _m: None)
    assert forced.name == "noisy" and "forced" in forced.reason and not forced.checks["noisy"]["passes"]
    with pytest.raises(ValueError, match="unknown search precision"):
        fidelity.choose(word_runtime, survey, "fp8", SPLIT.train, cfg)


def test_auto_takes_only_a_precision_that_passes(word_runtime, survey, registered, monkeypatch):
    """With the speed thresholds at 0 (both test precisions run at float32's speed), auto checks both: the broken
    one, faster or not, is never chosen; the faithful one is."""
    monkeypatch.setattr(fidelity, "PROBE_MIN", 0.0)
    monkeypatch.setattr(fidelity, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(precision, "PRECISIONS", {"fp32": precision.PRECISIONS["fp32"], "noisy": BROKEN})
    said = []
    none = fidelity.choose(word_runtime, survey, "auto", SPLIT.train, SearchConfig(**CFG), echo=said.append)
    assert none.name == "fp32" and none.requested == "auto" and not none.checks["noisy"]["passes"]
    assert "auto chose fp32" in said[0] and "Spearman" in said[1]
    monkeypatch.setitem(precision.PRECISIONS, "copy", FAITHFUL)
    chosen = fidelity.choose(word_runtime, survey, "auto", SPLIT.train, SearchConfig(**CFG), echo=lambda _m: None)
    assert chosen.name == "copy" and chosen.checks["copy"]["spearman"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["noisy", "bf16", "int8"])
def test_the_switch_is_honoured_and_the_reported_numbers_are_float32(word_runtime, survey, registered, tmp_path,
                                                                     name):
    reg = Registry(tmp_path / "adapters")
    settings = TrainSettings(search=SearchConfig(**CFG), split=SPLIT, search_precision=name,
                             force_search_precision=True)
    out = train(word_runtime, survey, TARGET, settings, reg, checkpoint_dir=tmp_path / "runs", progress=False,
                echo=lambda _m: None)
    prov = json.loads((out.adapter.path / "culign.json").read_text())
    assert prov["search_precision"] == out.report["search_precision"] == name
    assert prov["search_precision_choice"]["requested"] == name and name in prov["search_precision_choice"]["checks"]
    assert prov["runtime_dtype"] == "float32"
    # the saved prompt scored alone in float32 (what `culign eval` does) gives exactly the reported numbers ...
    loaded = reg.load("US", hidden_size=word_runtime.hidden_size, base_fingerprint=word_runtime.fingerprint)
    again = Evaluator(word_runtime, survey, TARGET, SPLIT).evaluate(Respondent("again", loaded.prompt))
    assert again.train_loss == prov["loss"] == out.report["train_loss"]
    assert again.heldout_loss == prov["heldout_loss"]
    # ... while the search's own objective was scored in the other precision
    assert out.report["objective"] != pytest.approx(again.train_loss, abs=1e-6)


def test_fp32_search_is_unchanged_by_the_switch(word_runtime, survey, tmp_path):
    """fp32 is the runtime itself: the same adapter as a run that never heard of search precisions, and the same
    checkpoint key (old checkpoints still resume)."""
    a = train(word_runtime, survey, TARGET, TrainSettings(search=SearchConfig(**CFG), split=SPLIT),
              Registry(tmp_path / "a"), progress=False, echo=lambda _m: None)
    b = train(word_runtime, survey, TARGET, TrainSettings(search=SearchConfig(**CFG), split=SPLIT,
                                                          search_precision="fp32"),
              Registry(tmp_path / "b"), progress=False, echo=lambda _m: None)
    assert a.report["search_precision"] == "fp32" and a.report["search_precision_choice"]["checks"] == {}
    assert torch.equal(a.search.prompt, b.search.prompt) and a.report["train_loss"] == b.report["train_loss"]


def test_the_environment_is_read_by_defaults_only_and_the_argument_wins():
    assert defaults.resolve(env={}).search_precision == "auto"
    assert defaults.resolve(env={"CULIGN_SEARCH_PRECISION": "INT8"}).search_precision == "int8"
    assert defaults.resolve(search_precision="bf16", env={"CULIGN_SEARCH_PRECISION": "int8"}).search_precision \
        == "bf16"


def test_the_api_and_the_cli_pass_it_through(word_runtime, registered, tmp_path):
    out = api.train("US", model=word_runtime, registry=tmp_path / "api", split=SPLIT, force_invalid=True,
                    search_precision="noisy", force_search_precision=True, **CFG)
    assert out.report["search_precision"] == "noisy"
    with pytest.raises(api.PrecisionRefused):
        api.train("US", model=word_runtime, registry=tmp_path / "api", split=SPLIT, force_invalid=True,
                  search_precision="noisy", **CFG)
    from culign.cli import main

    r = CliRunner().invoke(main, ["train", "--help"])
    text = " ".join(r.output.split())
    assert "--search-precision [auto|fp32|bf16|int8" in text and "--force-search-precision" in text
    r = CliRunner().invoke(main, ["train", "--region", "US", "--search-precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output
