"""The validity check: order slope, agreement, spread and Kendall's tau on hand-made rows; the verdicts; the cache (a
hit is bit-identical to a fresh run); the training gate (refuses, --force-invalid overrides, the adapter is marked)."""
import json
import math

import pytest

from culign import validity as V
from culign.survey import DIMENSIONS, Survey

P = ["vsm/t/asc", "vsm/t/desc", "plain/t/asc", "plain/t/desc"]


def _ind(value) -> dict:
    return {d: float(value if not callable(value) else value(d)) for d in DIMENSIONS}


def _rows(fn) -> dict:
    """country -> presentation -> dim -> index, fn(country_i, presentation, dim)."""
    return {f"c{i}": {p: {d: float(fn(i, p, d)) for d in DIMENSIONS} for p in P} for i in range(4)}


NAIVE = {p: _ind(50.0) for p in P}


def test_order_slope_follows_labels_or_position():
    meaning = _rows(lambda i, p, d: 50 + 3 * i)  # the same move on both orders
    position = _rows(lambda i, p, d: 50 + (3 * i if p.endswith("asc") else -3 * i))
    half = _rows(lambda i, p, d: 50 + (4 * i if p.endswith("asc") else 2 * i))
    assert V.order_slope(meaning, NAIVE) == pytest.approx(1.0)
    assert V.order_slope(position, NAIVE) == pytest.approx(-1.0)
    assert V.order_slope(half, NAIVE) == pytest.approx(0.5)
    assert V.order_slope(_rows(lambda i, p, d: 50), NAIVE) is None  # no move at all: no slope


def test_agreement_is_the_correlation_of_centred_moves_across_wordings():
    same = _rows(lambda i, p, d: 50 + 10 + 5 * i + DIMENSIONS.index(d))  # +10: a shift every persona makes alike
    assert V.agreement(same) == pytest.approx(1.0)
    flipped = _rows(lambda i, p, d: 50 + (5 * i if p.startswith("vsm") else -5 * i) * (1 + DIMENSIONS.index(d)))
    assert V.agreement(flipped) == pytest.approx(-1.0)
    # hand-computed: on vsm the centred moves are x, on plain y; r = pearson(x, y)
    x = [-1.5, -0.5, 0.5, 1.5]
    y = [-1.0, -1.0, 1.0, 1.0]
    rows = _rows(lambda i, p, d: 50 + (x[i] if p.startswith("vsm") else y[i]))
    want = sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
    assert V.agreement(rows) == pytest.approx(want)


def test_spread_noise_band_and_tau():
    rows = _rows(lambda i, p, d: 50 + 2 * i)
    assert V.spread(rows) == {d: pytest.approx(math.sqrt(1.25) * 2) for d in DIMENSIONS}  # pstdev of 0,2,4,6
    naive = {"a": _ind(40), "b": _ind(60)}
    assert V.noise_band(naive) == {d: pytest.approx(10.0) for d in DIMENSIONS}
    assert V.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert V.kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert V.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert V.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))  # tau-b with a tie in x
    assert V.kendall_tau([1, 1], [2, 2]) is None
    targets = {f"c{i}": {d: 10.0 * i for d in DIMENSIONS} for i in range(4)}
    targets["c3"] = {"PDI": 0.0}  # a country without a dimension's score is left out of that dimension's tau
    tau = V.tau_by_dimension(rows, targets)
    # PDI: 0,2,4,6 vs 0,10,20,0: 3 concordant, 2 discordant, 1 tied in y: tau-b = 1 / sqrt(5 * 6)
    assert tau["PDI"] == pytest.approx(1 / math.sqrt(30))
    assert tau["IDV"] == pytest.approx(1.0)


def test_verdicts():
    assert V.judge(-0.9, 0.9, 2.0, 0.6)[0] == V.POSITION
    assert V.judge(None, 0.9, 2.0, 0.6)[0] == V.POSITION
    verdict, why = V.judge(0.9, 0.1, 2.0, 0.0)
    assert verdict == V.NO_SIGNAL and any("agreement" in w for w in why) and any("tau" in w for w in why)
    assert V.judge(0.9, 0.9, 0.5, 0.6)[0] == V.NO_SIGNAL
    assert V.judge(0.9, 0.9, 2.0, 0.6) == (V.PASS, [])
    assert V.judge(V.SLOPE_MIN, V.AGREEMENT_MIN, V.SPREAD_MIN, V.TAU_MIN)[0] == V.PASS  # thresholds are inclusive


def _report(fn, readout="digit", targets=None):
    personas = _rows(fn)
    targets = targets or {f"c{i}": {d: 10.0 * i for d in DIMENSIONS} for i in range(4)}
    masses = {"naive": {p: 0.9 for p in P}, **{c: {p: 0.8 for p in P} for c in personas}}
    naive = {p: _ind(50 + (5 if p.endswith("desc") else 0)) for p in P}
    return V.build_report("m", "fp", readout, naive, personas, targets, masses)


def test_build_report_and_gate():
    good = _report(lambda i, p, d: 52 + 10 * i)  # follows meaning, agrees, spreads, ranks like the targets
    assert good.passes and good.follows_meaning and good.tau_mean == pytest.approx(1.0)
    assert good.option_mass == pytest.approx(0.9) and good.option_mass_min == pytest.approx(0.8)
    bad = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    assert bad.verdict == V.POSITION and not bad.passes
    assert V.ValidityReport.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    # the gate
    assert V.choose_readout({"digit": bad, "label": good}) == ("label", False)
    with pytest.raises(V.InvalidModelError) as e:
        V.choose_readout({"digit": bad})
    assert e.value.reports["digit"] is bad
    with pytest.raises(V.InvalidModelError):
        V.choose_readout({"digit": bad, "label": good}, "digit")
    assert V.choose_readout({"digit": bad}, "digit", force=True) == ("digit", True)
    assert V.choose_readout({"digit": bad, "label": bad}, force=True) == ("digit", True)


def test_cache_hit_is_bit_identical_to_a_fresh_run(word_runtime, tmp_path):
    survey = Survey.load()
    panel = ("USA", "CHI")  # a small panel: the statistics work on any size; the shipped one is PANEL
    steps = []
    fresh = V.check(word_runtime, survey, "label", panel=panel, cache_dir=tmp_path, on_step=steps.append)
    assert len(steps) == V.steps("label", panel) == 12 and not fresh.from_cache
    assert fresh.presentations == tuple(V.presentations("label"))
    hit = V.check(word_runtime, survey, "label", panel=panel, cache_dir=tmp_path, on_step=steps.append)
    assert hit.from_cache and len(steps) == 12  # nothing scored again
    assert hit == fresh and json.dumps(hit.to_dict()) == json.dumps(fresh.to_dict())
    assert V.cached(word_runtime, "digit", panel, cache_dir=tmp_path) is None  # per read-out


# ---------------------------------------------------------------------------------------------------- the gate, CLI
def _load_with(monkeypatch, runtime):
    """Every CLI command that loads a model gets ``runtime`` instead."""
    from culign.cli import measure, train

    for command_module in (measure, train):
        monkeypatch.setattr(command_module, "load_runtime", lambda *a, **k: runtime)


def _cli_train(monkeypatch, word_runtime, tmp_path, reports, *extra):
    from click.testing import CliRunner

    import culign.cli as cli

    _load_with(monkeypatch, word_runtime)
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: reports[readout])
    args = ["train", "--region", "US", "--tokens", "4", "--dim", "8", "--popsize", "6", "--budget", "12",
            "--train-presentation", "vsm/chat/asc", "--heldout", "vsm/chat/desc", "--no-validation", "--no-progress",
            "--adapters-dir", str(tmp_path / "adapters"), "--checkpoint-dir", str(tmp_path / "runs"), *extra]
    return CliRunner().invoke(cli.main, args)


def test_training_refuses_an_invalid_model_and_force_invalid_overrides(monkeypatch, word_runtime, tmp_path):
    from click.testing import CliRunner

    import culign.cli as cli
    from culign.serving.adapter_cache import AdapterCache
    from culign.registry import Registry

    bad = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    r = _cli_train(monkeypatch, word_runtime, tmp_path, {"digit": bad})
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "does not pass the validity check" in r.output and "follows position" in r.output
    assert "order slope -1.00" in r.output and "--force-invalid" in r.output
    assert not (tmp_path / "adapters").exists()  # nothing trained, nothing written

    r = _cli_train(monkeypatch, word_runtime, tmp_path, {"digit": bad}, "--force-invalid")
    assert r.exit_code == 0, r.output
    assert "TRAINED WITH --force-invalid" in r.output
    folder = tmp_path / "adapters" / "US" / "1"
    prov = json.loads((folder / "culign.json").read_text())
    assert prov["forced_invalid"] is True and prov["readout"] == "digit"
    assert prov["validity"]["digit"]["verdict"] == V.POSITION
    report = json.loads((folder / "report.json").read_text())
    assert report["forced_invalid"] is True and "Trained with --force-invalid" in (folder / "report.html").read_text()
    listed = CliRunner().invoke(cli.main, ["adapters", "list", "--adapters-dir", str(tmp_path / "adapters")])
    assert "INVALID MODEL" in listed.output
    registry = Registry(tmp_path / "adapters")
    assert registry.scan()[0][0].forced_invalid
    cache = AdapterCache(registry, word_runtime)
    cache.rescan()
    assert cache.forced_invalid("US") == [1]  # what /v1/models lists as forced_invalid_versions


class _Captured(Exception):
    pass


def _train_cli(monkeypatch, word_runtime, seen: dict):
    """`culign train ...` on the tiny model, stopped where the trainer would start: ``seen`` gets its keywords and
    split; returns the CliRunner result (its exception is _Captured when the gate let the run through)."""
    from click.testing import CliRunner

    import culign.cli as cli
    import culign.trainer as trainer

    def fake_train(rt, survey, target, settings, registry, **kw):
        seen.update(kw, split=settings.split)
        raise _Captured

    monkeypatch.setattr(trainer, "train", fake_train)
    _load_with(monkeypatch, word_runtime)
    return lambda *args: CliRunner().invoke(cli.main, ["train", "--region", "US", "--no-progress", *args])


def test_training_takes_the_read_out_that_passes_and_trains_it_on_both_orders(monkeypatch, word_runtime, tmp_path):
    seen = {}
    train = _train_cli(monkeypatch, word_runtime, seen)
    position = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    good = _report(lambda i, p, d: 52 + 10 * i, readout="label")
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: {"digit": position, "label": good}[readout])
    r = train()
    assert isinstance(r.exception, _Captured), r.output
    assert seen["readout"] == "label" and not seen["forced_invalid"] and seen["order_balanced"]
    split = seen["split"]
    assert split.leaks() == [] and {n.rsplit("/", 1)[1] for n in split.train} == {"asc", "desc"}
    assert all(n.split("/")[1].startswith("label_") for n in split.all_names)
    assert "order:desc" not in split.heldout and set(split.heldout) >= {"wording:formal", "template:label_interview"}
    assert seen["validity"]["label"]["verdict"] == V.PASS and seen["validity"]["digit"]["verdict"] == V.POSITION


def test_order_balanced_is_a_choice_forced_or_refused(monkeypatch, word_runtime):
    """--order-balanced trains both orders where the check would not (a forced, failing read-out); --no-order-balanced
    keeps one order where it would."""
    seen = {}
    train = _train_cli(monkeypatch, word_runtime, seen)
    position = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5), readout="label")
    good = _report(lambda i, p, d: 52 + 10 * i, readout="label")

    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: position)
    r = train("--readout", "label", "--force-invalid", "--order-balanced")
    assert isinstance(r.exception, _Captured), r.output
    assert seen["forced_invalid"] and seen["order_balanced"] and seen["readout"] == "label"
    assert seen["split"].leaks() == [] and {n.rsplit("/", 1)[1] for n in seen["split"].train} == {"asc", "desc"}
    assert "order:desc" not in seen["split"].heldout and "asked for both orders" in r.output

    seen.clear()
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: good)
    r = train("--readout", "label", "--no-order-balanced")
    assert isinstance(r.exception, _Captured), r.output
    assert not seen["order_balanced"] and {n.rsplit("/", 1)[1] for n in seen["split"].train} == {"asc"}
    assert "order:desc" in seen["split"].heldout


def test_validity_command_prints_verdicts_and_json(monkeypatch, word_runtime):
    from click.testing import CliRunner

    import culign.cli as cli

    _load_with(monkeypatch, word_runtime)
    position = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    good = _report(lambda i, p, d: 52 + 10 * i, readout="label")
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: {"digit": position, "label": good}[readout])
    r = CliRunner().invoke(cli.main, ["validity"])
    assert r.exit_code == 0, r.output
    assert "digit  verdict: follows position" in r.output and "label  verdict: follows meaning and culture" in r.output
    data = json.loads(CliRunner().invoke(cli.main, ["validity", "--readout", "label", "--json"]).output)
    assert list(data) == ["label"] and data["label"]["passes"] and data["label"]["thresholds"]["tau_mean"] == 0.3


def test_validity_command_says_what_train_will_do(monkeypatch, word_runtime):
    """No read-out passes: a meaning-following one is named as what train takes (with a warning); with none,
    train refuses."""
    from click.testing import CliRunner

    import culign.cli as cli

    _load_with(monkeypatch, word_runtime)
    position = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    reversed_culture = _report(lambda i, p, d: 92 - 10 * i, readout="label")  # follows the labels, ranks backwards
    assert reversed_culture.follows_meaning and not reversed_culture.passes
    reports = {"digit": position, "label": reversed_culture}
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: reports[readout])
    r = CliRunner().invoke(cli.main, ["validity"])
    assert r.exit_code == 0, r.output
    assert "but label follows meaning: `culign train` trains on it" in r.output and "refuses" not in r.output
    r = CliRunner().invoke(cli.main, ["validity", "--readout", "digit"])
    assert "none follows meaning" in r.output and "refuses to train on it (exit 2)" in r.output


def test_eval_reads_labels_and_shows_the_validity_block(monkeypatch, word_runtime):
    from click.testing import CliRunner

    import culign.cli as cli

    _load_with(monkeypatch, word_runtime)
    good = _report(lambda i, p, d: 52 + 10 * i, readout="label")
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: good)
    args = ["eval", "--region", "US", "--readout", "label", "--train-presentation", "vsm/label_chat/asc",
            "--heldout", "vsm/label_chat/desc", "--no-validation"]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    assert "label read-out" in r.output and "label  verdict: follows meaning and culture" in r.output
    data = json.loads(CliRunner().invoke(cli.main, [*args, "--json"]).stdout)
    assert data["readout"] == "label" and set(data["rows"][0]["per_presentation"]) == {"vsm/label_chat/asc",
                                                                                     "vsm/label_chat/desc"}
    r = CliRunner().invoke(cli.main, [*args[:5], "--train-presentation", "vsm/chat/asc"])
    assert r.exit_code == 2 and "digit read-out, not label" in r.output


def test_the_fan_out_is_gated_once_before_any_region_starts(monkeypatch, tmp_path):
    """culign.train_regions runs the check in the driver: a failing model never reaches Ray, and a forced run hands
    every region the same gate (read-out, verdicts, forced mark) so each adapter is marked."""
    import culign
    from culign import api
    from conftest import build_tiny_model, build_word_tokenizer

    model_dir = tmp_path / "tiny"
    tok = build_word_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bad = _report(lambda i, p, d: 50 + (10 * i if p.endswith("asc") else -10 * i + 5))
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: bad)
    started = []
    monkeypatch.setattr(api, "fan_out", lambda jobs, **kw: started.append(jobs) or [])
    with pytest.raises(culign.InvalidModelError):
        culign.train_regions(["US", "CN"], model=str(model_dir), registry=tmp_path / "reg", readout="digit",
                             presentations=["vsm/chat/asc"], budget=16, popsize=8)
    assert started == []
    culign.train_regions(["US", "CN"], model=str(model_dir), registry=tmp_path / "reg", readout="digit",
                         presentations=["vsm/chat/asc"], budget=16, popsize=8, force_invalid=True)
    (jobs,) = started
    assert [j.target.key for j in jobs] == ["US", "CN"]
    assert all(j.gate["forced_invalid"] and j.gate["readout"] == "digit" for j in jobs)
    assert all(j.gate["validity"]["digit"]["verdict"] == V.POSITION for j in jobs)
    assert all(j.adapters == str((tmp_path / "reg").resolve()) for j in jobs)  # workers have other working dirs
