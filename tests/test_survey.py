"""The instrument as data: index formulas, L1 loss, wordings, templates, presentations, the split (no model)."""
import itertools
import json

import pytest

from culign.survey import (DEFAULT_CONSTANT, DEFAULT_SPLIT, LEGACY_NAMES, ORDERS, Split, Survey, SurveyDataError,
                           Template, Wording, l1_loss)


@pytest.fixture(scope="module")
def survey():
    return Survey.load()


def test_instrument_shape(survey):
    assert len(survey.items) == 24
    assert set(survey.formulas) == {"PDI", "IDV", "MAS", "UAI", "LTO", "IVR"}
    # MAS uses 35 for (m08 - m10), as in the VSM 2013 manual (one paper prints 25)
    assert (35.0, 8, 10) in survey.formulas["MAS"]


def test_midpoint_everywhere_scores_the_constant(survey):
    means = {i: 3.0 for i in range(1, 25)}
    assert survey.indices(means) == {d: DEFAULT_CONSTANT for d in survey.formulas}
    assert survey.indices(means, 0.0)["PDI"] == 0.0


def test_known_answer_vector(survey):
    means = {i: 3.0 for i in range(1, 25)}
    means.update({7: 4.0, 2: 2.0, 20: 5.0, 23: 1.0})  # PDI = 35*2 + 25*4 + C
    means.update({4: 1.0, 1: 2.0})  # IDV = 35*(1-2) + 35*0 + C
    means.update({18: 2.5, 15: 3.5})  # UAI = 40*(-1) + C
    means.update({17: 1.0, 16: 2.0, 12: 3.0, 11: 3.0})  # IVR = 40*(-1)
    idx = survey.indices(means, {"PDI": 10, "IDV": 20})
    assert idx["PDI"] == pytest.approx(35 * 2 + 25 * 4 + 10)
    assert idx["IDV"] == pytest.approx(-35 + 20)
    assert idx["UAI"] == pytest.approx(-40 + DEFAULT_CONSTANT)
    assert idx["IVR"] == pytest.approx(-40 + DEFAULT_CONSTANT)
    assert idx["MAS"] == pytest.approx(DEFAULT_CONSTANT)


def test_l1_partial_target():
    idx = {"PDI": 50.0, "IDV": 60.0, "MAS": 10.0, "UAI": 0.0, "LTO": 0.0, "IVR": 0.0}
    assert l1_loss(idx, {"PDI": 40, "IDV": 80}) == pytest.approx((10 + 20) / 2)
    assert l1_loss(idx, {"LTO": 36, "IVR": 52}) == pytest.approx((36 + 52) / 2)
    with pytest.raises(ValueError):
        l1_loss(idx, {})


# ---------------------------------------------------------------------------------------------------- wordings
def test_shipped_wordings_are_complete_and_different(survey):
    assert set(survey.wordings) >= {"vsm", "plain", "formal", "casual", "terse"}
    for w in survey.wordings.values():
        assert sorted(w.items) == list(range(1, 25)) and w.note
        assert all(len(it.scale) == 5 and all(it.scale.values()) for it in w.items.values())
    for a, b in itertools.combinations(survey.wordings.values(), 2):
        same = [i for i in range(1, 25) if a.items[i].text == b.items[i].text]
        assert not same, f"{a.name} and {b.name} word items {same} alike"
    # the answer direction is the official one: answer 1 is the 'most' end, item 20 runs never -> always
    for w in survey.wordings.values():
        assert "never" in w.items[20].scale[1].lower() or "no time" in w.items[20].scale[1].lower()


def test_templates_hold_every_field(survey):
    assert len(survey.templates) >= 4
    for t in survey.templates.values():
        assert "{text}" in t.user_template and "{options}" in t.user_template and t.prefill


def test_reversed_order_renumbers_and_maps_back(survey):
    rev = survey.presentation("reversed")
    assert rev.name == "vsm/chat/desc" and rev.reverse
    item = survey.items[0]
    text = rev.messages(item.id)[1]["content"]
    assert f"1 = {item.scale[5]}" in text and f"5 = {item.scale[1]}" in text
    assert [rev.digit_to_answer(d) for d in (1, 2, 3, 4, 5)] == [5, 4, 3, 2, 1]
    assert survey.presentation("standard").digit_to_answer(2) == 2


def test_presentations_are_wording_x_template_x_order(survey):
    names = survey.presentation_names()
    assert len(names) == len(survey.wordings) * len(survey.templates) * len(ORDERS)
    p = survey.presentation("plain/form/asc")
    assert p.families == ("wording:plain", "template:form", "order:asc")
    msgs = p.messages(21, persona="China")
    assert survey.wordings["plain"].items[21].text in msgs[1]["content"]
    assert "typical person from China" in msgs[0]["content"] and survey.templates["form"].system in msgs[0]["content"]
    assert {LEGACY_NAMES[n] for n in ("standard", "reversed", "inline")} <= set(names)
    for bad in ("nope", "vsm/nope/asc", "vsm/chat/sideways", "a/b/c/d"):
        with pytest.raises(ValueError, match="unknown"):
            survey.presentation(bad)
    assert survey.expand(["vsm/*/asc"]) == [f"vsm/{t}/asc" for t in survey.templates]
    with pytest.raises(ValueError, match="matches nothing"):
        survey.expand(["zzz/*"])


def test_legacy_standard_prompt_is_unchanged(survey):
    """Adapters trained on 'standard' before presentations became data must see the same prompt text."""
    p = survey.presentation("standard")
    user = p.messages(1)[1]["content"]
    assert user.startswith(survey.items[0].stem + "\nAnswer with one number from 1 to 5:\n1 = of utmost importance")
    assert user.endswith("\n\nhave sufficient time for your personal or home life")
    assert p.messages(15)[1]["content"].startswith("Answer with one number")  # no stem: no leading blank line


# ---------------------------------------------------------------------------------------------------- validation
def _wording_dict(survey, **change):
    items = [{"id": it.id, "stem": it.stem, "text": it.text, "scale": {str(k): v for k, v in it.scale.items()}}
             for it in survey.items]
    d = {"name": "mine", "title": "Mine", "note": "a test wording", "items": items}
    d.update(change)
    return d


def _write(tmp_path, obj, text=None):
    p = tmp_path / "w.json"
    p.write_text(text if text is not None else json.dumps(obj, indent=1))
    return p


def test_a_good_user_wording_loads_and_makes_presentations(survey, tmp_path):
    p = _write(tmp_path, _wording_dict(survey))
    s = Survey.load(wording_files=[p])
    assert "mine" in s.wordings and s.presentation("mine/chat/asc").item(5).text == survey.items[4].text


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["items"].pop(6), r"item\(s\) 7 missing"),
    (lambda d: d["items"][2]["scale"].pop("5"), r"item 3.*five labels"),
    (lambda d: d["items"][4]["scale"].update({"2": " "}), r"item 5.*label for answer 2 is empty"),
    (lambda d: d["items"][9].update({"text": ""}), r"item 10.*'text'"),
    (lambda d: d["items"].append(dict(d["items"][0])), r"item 1.*twice"),
    (lambda d: d["items"][0].update({"id": 99}), r"item 99.*no item 99"),
    (lambda d: d.update({"name": "has space"}), r"'name'"),
    (lambda d: d.update({"name": "vsm"}), r"exists already"),
])
def test_a_bad_wording_is_an_error_naming_the_item(survey, tmp_path, mutate, message):
    d = _wording_dict(survey)
    mutate(d)
    with pytest.raises(SurveyDataError, match=message):
        Survey.load(wording_files=[_write(tmp_path, d)])


def test_bad_json_names_the_line(survey, tmp_path):
    text = json.dumps(_wording_dict(survey), indent=1).replace('"id": 12,', '"id": 12,,', 1)
    with pytest.raises(SurveyDataError, match=r"line \d+, column"):
        Wording.load(_write(tmp_path, None, text), survey.item_ids)
    d = _wording_dict(survey)
    d["items"][11]["scale"] = ["a", "b"]
    with pytest.raises(SurveyDataError, match=r"item 12 \(line \d+\)"):
        Wording.load(_write(tmp_path, d), survey.item_ids)


@pytest.mark.parametrize("change, message", [
    ({"prefill": None}, "'prefill' is missing"),
    ({"user_template": "{stem} only"}, "must contain {text}"),
    ({"option_format": "{digit}"}, "must contain {label}"),
    ({"user_template": "{text} {options} {nope}"}, "unknown placeholder"),
])
def test_a_bad_template_is_an_error_naming_the_field(change, message):
    raw = {"name": "t", "system": "s", "user_template": "{stem} {text} {options}", "option_format": "{digit} {label}",
           "option_joiner": "\n", "prefill": "A: ", **change}
    with pytest.raises(SurveyDataError, match=message):
        Template.from_dict(raw, "templates.json")


# ---------------------------------------------------------------------------------------------------- the split
def test_default_split_cannot_leak(survey):
    split = DEFAULT_SPLIT
    assert split.leaks() == []
    assert len(split.train) >= 8
    train, val, held = set(split.train), set(split.validation_names), set(split.heldout_names)
    assert not (train & val) and not (train & held) and not (val & held)
    parts = lambda names, i: {n.split("/")[i] for n in names}  # noqa: E731
    # at least one whole wording and one whole template never appear in training in any combination
    assert parts(held, 0) - parts(train, 0) and parts(held, 1) - parts(train, 1)
    assert "desc" in parts(held, 2) and parts(train, 2) == {"asc"}  # plus the reversed order
    # validation has a wording and a template of its own too, shared with neither training nor held-out
    assert parts(val, 0) - parts(train, 0) - parts(held, 0) and parts(val, 1) - parts(train, 1) - parts(held, 1)
    for name in split.all_names:
        survey.presentation(name)  # every name exists


def test_leaks_are_found():
    bad = Split(("vsm/chat/asc", "formal/chat/asc"), {}, {"wording:formal": ("formal/inline/asc",),
                                                          "mixed": ("vsm/chat/asc",)})
    leaks = bad.leaks()
    assert any("wording 'formal' appears in training" in x for x in leaks)
    assert any("contains training" in x for x in leaks)


def test_overrides(survey):
    s = survey.split(train=["standard", "plain/chat/asc"])
    assert s.train == ("vsm/chat/asc", "plain/chat/asc") and "vsm/chat/asc" not in s.heldout_names
    s = survey.split(heldout=["formal/*/asc"])
    assert list(s.heldout) == ["formal/*/asc"] and len(s.heldout["formal/*/asc"]) == \
        len([t for t in survey.templates.values() if t.readout == "digit"])  # patterns match the read-out's templates
    with pytest.raises(ValueError, match="contains training"):
        survey.split(heldout=["vsm/chat/asc"])
    assert survey.split(validation=[]).validation == {}
