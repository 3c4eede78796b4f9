"""The post-training verdict on hand-made rows at each threshold (below / at / above), with families missing and
with the reversed family gone after order-balanced training; the gate by what it can know (position-following is
refused with exit 2, a meaning-following "no cultural signal" read-out trains order-balanced with a warning); and
the verdict's way into provenance, `adapters list`, AdapterInfo and /v1/models."""
import json

import pytest

from culign import validity as V
from culign import verdict as VD
from culign.evaluation import Comparison, Evaluation, PresentationScore
from culign.registry import AdapterInfo, Registry
from culign.survey import DEFAULT_LABEL_SPLIT, DIMENSIONS, Split, both_orders
from culign.targets import parse_custom

TARGET = parse_custom("PDI=60,IDV=40", "t")
# one training presentation; held out: a new wording, a new template and the reversed scale (w/t/desc: the order
# slope's pair with w/t/asc)
SPLIT = Split(("w/t/asc",), {}, {"wording:x": ("x/t/asc",), "template:u": ("w/u/asc",), "order:desc": ("w/t/desc",)})
# the naive model's losses: 8, 12, 8, 12 -> its L1 noise band (pstdev) is exactly 2.0
NAIVE_LOSS = {"w/t/asc": 8.0, "x/t/asc": 12.0, "w/u/asc": 8.0, "w/t/desc": 12.0}
BAND = 2.0


def _score(name, loss, move=0.0):
    return PresentationScore(name, {d: 50.0 + move for d in DIMENSIONS}, loss, 0.9, 0.5)


def _comparison(gains, slope=1.0, split=SPLIT, naive_loss=None, scored=None):
    """naive (indices 50, ``naive_loss``) and an adapter whose loss on each held-out family is the naive one minus
    ``gains[family]`` (4 below it on training), moving every index +10 on ascending presentations and +10 x ``slope``
    on their reversed twins (``slope`` None: no move, so no order slope). ``scored``: the adapter's presentations."""
    naive_loss = naive_loss or NAIVE_LOSS
    family = {n: f for f, names in split.heldout.items() for n in names}
    naive = Evaluation("naive", TARGET, split, {n: _score(n, naive_loss[n]) for n in split.all_names})
    rows = {}
    for n in scored if scored is not None else split.all_names:
        move = 0.0 if slope is None else (10.0 if n.endswith("/asc") else 10.0 * slope)
        rows[n] = _score(n, naive_loss[n] - gains.get(family.get(n), 4.0), move)
    return Comparison(TARGET, split, [naive, Evaluation("adapter", TARGET, split, rows)])


def _judge(*a, **k):
    c = _comparison(*a, **k)
    return VD.judge(c, c.rows[-1])


ALL = ("wording:x", "template:u", "order:desc")


def test_the_noise_band_of_the_hand_made_rows():
    c = _comparison(dict.fromkeys(ALL, 3.0))
    assert c.noise_band()["L1"] == BAND and c.order_slope(c.rows[-1]) == pytest.approx(1.0)


@pytest.mark.parametrize("gain,verdict", [(BAND - 1e-6, VD.NOT_SHOWN), (BAND, VD.NOT_SHOWN),
                                          (BAND + 1e-6, VD.ALIGNED)])
def test_a_family_gain_must_exceed_the_noise_band(gain, verdict):
    """At the band is inside it (as Comparison.significance marks it n.s.); every family must clear it."""
    v = _judge({"wording:x": 3.0, "template:u": 3.0, "order:desc": gain})
    assert v.verdict == verdict and v.band == BAND
    assert v.families["wording:x"] == {"gain": pytest.approx(3.0), "shown": True}
    assert v.families["order:desc"]["shown"] is (verdict == VD.ALIGNED)
    if verdict == VD.NOT_SHOWN:
        assert len(v.reasons) == 1 and v.reasons[0].startswith("order:desc gain") and "noise band 2.00" in v.reasons[0]
    else:
        assert v.aligned and v.reasons == () and v.line() == VD.ALIGNED


def test_every_family_must_show_it_and_a_loss_is_named():
    v = _judge({"wording:x": 3.0, "template:u": -1.0, "order:desc": 3.0})
    assert v.verdict == VD.NOT_SHOWN and [r.split()[0] for r in v.reasons] == ["template:u"]
    assert "-1.00" in v.reasons[0]


@pytest.mark.parametrize("slope,verdict", [(V.SLOPE_MIN - 1e-6, V.POSITION), (V.SLOPE_MIN, VD.ALIGNED),
                                           (V.SLOPE_MIN + 1e-6, VD.ALIGNED), (-1.0, V.POSITION)])
def test_the_order_slope_of_the_adapters_own_moves(slope, verdict):
    v = _judge(dict.fromkeys(ALL, 3.0), slope=slope)
    assert v.verdict == verdict and v.order_slope == pytest.approx(slope)
    if verdict == V.POSITION:
        assert "order slope" in v.reasons[0] and VD.POSITION == "follows position"


def test_position_comes_before_the_gains():
    """Gains that do not clear the band and a slope below 0.5: the slope says why (a gain in position is none)."""
    assert _judge(dict.fromkeys(ALL, 0.0), slope=-1.0).verdict == V.POSITION


def test_missing_families_and_missing_numbers():
    # a held-out family the adapter was not scored on cannot show the gain
    v = _judge(dict.fromkeys(ALL, 3.0), scored=["w/t/asc", "x/t/asc", "w/t/desc"])
    assert v.verdict == VD.NOT_SHOWN and v.reasons == ("template:u not scored",)
    assert v.families["template:u"] == {"gain": None, "shown": False}
    # an interrupted run: the adapter scored on training only -> nothing held out to judge
    v = _judge(dict.fromkeys(ALL, 3.0), scored=["w/t/asc"])
    assert v.verdict == VD.NOT_JUDGED and "no held-out presentation" in v.reasons[0]
    # a split without held-out families
    no_heldout = Split(("w/t/asc", "w/t/desc"))
    assert _judge({}, split=no_heldout).verdict == VD.NOT_JUDGED
    # gains clear the band, but no presentation in both orders moved: position cannot be ruled out
    asc_only = Split(("w/t/asc",), {}, {"wording:x": ("x/t/asc",), "template:u": ("w/u/asc",)})
    v = _judge({"wording:x": 3.0, "template:u": 3.0}, split=asc_only, naive_loss={**NAIVE_LOSS})
    assert v.order_slope is None and v.verdict == VD.NOT_JUDGED and "both scale orders" in v.reasons[0]


def test_after_order_balanced_training_the_reversed_family_is_not_judged_but_the_slope_still_is():
    """Training took both orders: no order:desc family (both_orders drops it); the slope is still gated."""
    split = both_orders(DEFAULT_LABEL_SPLIT)
    assert "order:desc" not in split.heldout
    naive_loss = {n: 8.0 if i % 2 else 12.0 for i, n in enumerate(split.all_names)}
    c = _comparison(dict.fromkeys(split.heldout, BAND + 3), split=split, naive_loss=naive_loss)
    band = c.noise_band()["L1"]
    v = VD.judge(c, c.rows[-1])
    assert v.verdict == VD.ALIGNED and set(v.families) == set(split.heldout) == {
        "wording:formal", "template:label_interview", "unseen:all"}
    assert v.band == band
    c = _comparison(dict.fromkeys(split.heldout, BAND + 3), slope=0.2, split=split, naive_loss=naive_loss)
    assert VD.judge(c, c.rows[-1]).verdict == V.POSITION


def test_the_verdict_as_recorded():
    v = _judge({"wording:x": 3.0, "template:u": 1.0, "order:desc": 3.0})
    d = json.loads(json.dumps(v.to_dict()))
    assert d["verdict"] == VD.NOT_SHOWN and d["aligned"] is False and d["band"] == BAND
    assert d["thresholds"] == {"gain_min_bands": 1.0, "family_share": 1.0, "order_slope": V.SLOPE_MIN}
    assert d["families"]["template:u"] == {"gain": pytest.approx(1.0), "shown": False}
    # the registry may not import culign.verdict: its default words must be the same
    assert AdapterInfo.verdict == VD.NOT_JUDGED


def test_the_table_prints_the_verdict_for_every_row():
    from culign.report import format_table, verdict_of

    table = format_table(_comparison(dict.fromkeys(ALL, 3.0)))
    assert f"adapter verdict: {VD.ALIGNED}" in table
    assert verdict_of({}) == VD.NOT_JUDGED and verdict_of({"verdict": {"verdict": VD.NOT_SHOWN}}) == VD.NOT_SHOWN


# ---------------------------------------------------------------------------------------------------- the gate
def _validity(verdict, slope, readout="label"):
    """A ValidityReport by hand (the Qwen2.5-Coder-1.5B label read-out's numbers of issue 28 by default)."""
    reasons = () if verdict == V.PASS else ("agreement across wordings +0.25 < 0.5",)
    return V.ValidityReport("m", "fp", readout, "0", ("vsm/label_chat/asc",), ("United States",), slope, 0.25,
                            dict.fromkeys(DIMENSIONS, 1.41), dict.fromkeys(DIMENSIONS, 14.2),
                            dict.fromkeys(DIMENSIONS, 0.05), 0.78, 0.5, verdict, reasons, 1.0)


def test_choose_readout_trains_what_follows_meaning_and_refuses_position():
    no_signal, position = _validity(V.NO_SIGNAL, 0.68), _validity(V.POSITION, -0.23, "digit")
    assert V.trainable(no_signal) and not V.trainable(position)
    assert V.trainable(_validity(V.NO_SIGNAL, V.SLOPE_MIN))  # the threshold is inclusive
    assert not V.trainable(_validity(V.NO_SIGNAL, V.SLOPE_MIN - 1e-6))  # a report read under other thresholds
    assert V.choose_readout({"digit": position, "label": no_signal}) == ("label", False)
    assert V.choose_readout({"label": no_signal}, "label") == ("label", False)
    with pytest.raises(V.InvalidModelError):
        V.choose_readout({"digit": position, "label": no_signal}, "digit")
    with pytest.raises(V.InvalidModelError):
        V.choose_readout({"digit": position})
    assert V.choose_readout({"digit": position}, force=True) == ("digit", True)
    # a read-out that passes is preferred to one that only follows meaning, whatever the order
    assert V.choose_readout({"digit": _validity(V.NO_SIGNAL, 0.9, "digit"), "label": _validity(V.PASS, 0.9)}) \
        == ("label", False)


class _Captured(Exception):
    pass


def _cli(monkeypatch, runtime, reports):
    from culign.cli import measure, train

    for module in (measure, train):
        monkeypatch.setattr(module, "load_runtime", lambda *a, **k: runtime)
    monkeypatch.setattr(V, "cached", lambda rt, readout, *a, **k: reports[readout])


def test_the_gate_refuses_position_and_trains_no_signal_order_balanced(monkeypatch, word_runtime):
    from click.testing import CliRunner

    import culign.cli as cli
    import culign.trainer as trainer

    seen = {}

    def fake_train(rt, survey, target, settings, registry, **kw):
        seen.update(kw, split=settings.split)
        raise _Captured

    monkeypatch.setattr(trainer, "train", fake_train)
    _cli(monkeypatch, word_runtime, {"digit": _validity(V.POSITION, -0.23, "digit"),
                                     "label": _validity(V.NO_SIGNAL, 0.68)})
    run = lambda *a: CliRunner().invoke(cli.main, ["train", "--region", "US", "--no-progress", *a])  # noqa: E731

    r = run("--readout", "digit")
    assert r.exit_code == 2 and "follows position" in r.output and "--force-invalid" in r.output, r.output
    assert not seen

    r = run()  # no --readout: the label read-out, which follows meaning
    assert isinstance(r.exception, _Captured), r.output
    assert seen["readout"] == "label" and not seen["forced_invalid"] and seen["order_balanced"]
    assert {n.rsplit("/", 1)[1] for n in seen["split"].train} == {"asc", "desc"} and seen["split"].leaks() == []
    assert "order:desc" not in seen["split"].heldout
    assert "order slope +0.68" in r.output and "label  verdict: no cultural signal" in r.output  # the numbers
    assert "warning: the label read-out follows meaning" in r.output and "order-balanced" in r.output
    assert "Only the post-training verdict can call the result an alignment" in r.output


def test_a_no_signal_run_records_its_verdict_everywhere(monkeypatch, word_runtime, tmp_path):
    """A real (tiny) training on a "no cultural signal" read-out: not forced, and its verdict reaches provenance,
    the report, `adapters list` / `show`, AdapterInfo and /v1/models; an adapter saved before verdicts shows "not
    judged" everywhere."""
    import torch
    from click.testing import CliRunner

    import culign.cli as cli
    from culign.serving.adapter_cache import AdapterCache
    from culign.serving.router import RegionRouter

    _cli(monkeypatch, word_runtime, {"digit": _validity(V.NO_SIGNAL, 0.68, "digit")})
    reg_dir = tmp_path / "adapters"
    registry = Registry(reg_dir)
    registry.save("CN", torch.randn(2, word_runtime.hidden_size), base_model=word_runtime.name,  # an old adapter
                  base_fingerprint=word_runtime.fingerprint, provenance={})
    args = ["train", "--region", "US", "--tokens", "4", "--dim", "8", "--popsize", "6", "--budget", "12",
            "--train-presentation", "vsm/chat/asc", "--heldout", "vsm/chat/desc", "--heldout", "plain/chat/asc",
            "--no-validation", "--no-progress", "--adapters-dir", str(reg_dir), "--checkpoint-dir",
            str(tmp_path / "runs")]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    assert "warning: the digit read-out follows meaning" in r.output and "in one scale order" in r.output
    folder = reg_dir / "US" / "1"
    prov = json.loads((folder / "culign.json").read_text())
    v = prov["verdict"]
    assert not prov["forced_invalid"] and v["verdict"] in (VD.ALIGNED, VD.NOT_SHOWN, V.POSITION)
    assert set(v["families"]) == {"vsm/chat/desc", "plain/chat/asc"} and v["thresholds"] == VD.thresholds()
    report = json.loads((folder / "report.json").read_text())
    assert report["verdict"] == v and f"US@1 verdict: {v['verdict']}" in r.output
    assert "Verdict: <span class=" in (folder / "report.html").read_text()

    listed = CliRunner().invoke(cli.main, ["adapters", "list", "--adapters-dir", str(reg_dir)])
    assert listed.exit_code == 0 and "verdict" in listed.output.splitlines()[0]
    lines = {ln.split()[0]: ln for ln in listed.output.splitlines()[1:]}
    assert v["verdict"] in lines["US@1"] and VD.NOT_JUDGED in lines["CN@1"]
    shown = CliRunner().invoke(cli.main, ["adapters", "show", "US", "--adapters-dir", str(reg_dir)])
    assert f"verdict                   {v['verdict']}" in shown.output
    as_json = json.loads(CliRunner().invoke(cli.main, ["adapters", "list", "--adapters-dir", str(reg_dir),
                                                       "--json"]).output)
    assert {a["ref"]: a["verdict"] for a in as_json["adapters"]} == {"CN@1": VD.NOT_JUDGED, "US@1": v["verdict"]}

    cache = AdapterCache(Registry(reg_dir), word_runtime)
    cache.rescan()
    cards = {m["id"]: m for m in RegionRouter(cache, word_runtime.name).models(None, 0, {})}
    assert cards["US"]["verdict"] == v["verdict"] and cards["US"]["verdicts"] == {"1": v["verdict"]}
    assert cards["CN"]["verdict"] == VD.NOT_JUDGED and cards["CN"]["verdicts"] == {"1": VD.NOT_JUDGED}
