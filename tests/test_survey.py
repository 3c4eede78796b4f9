"""Index formulas, L1 loss and presentations on hand-made answers (no model)."""
import pytest

from culign.survey import DEFAULT_CONSTANT, PRESENTATIONS, Survey, get_presentation, l1_loss, summarize


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


def test_reversed_presentation_renumbers_and_maps_back(survey):
    rev = get_presentation("reversed")
    item = survey.items[0]
    text = rev.messages(item)[1]["content"]
    assert f"1 = {item.scale[5]}" in text and f"5 = {item.scale[1]}" in text
    assert [rev.digit_to_answer(d) for d in (1, 2, 3, 4, 5)] == [5, 4, 3, 2, 1]
    assert get_presentation("standard").digit_to_answer(2) == 2


def test_presentations_differ_and_persona(survey):
    item = survey.items[20]
    texts = {n: p.messages(item)[1]["content"] for n, p in PRESENTATIONS.items()}
    assert len(set(texts.values())) == len(texts) >= 3
    assert all(item.text in t for t in texts.values())
    sys_line = get_presentation("standard").messages(item, persona="China")[0]["content"]
    assert "typical person from China" in sys_line
    with pytest.raises(ValueError, match="unknown presentation"):
        get_presentation("nope")


def test_summarize_averages_presentations(survey):
    a = {i: 2.0 for i in range(1, 25)}
    b = {i: 4.0 for i in range(1, 25)}
    b[7] = 5.0
    r = summarize(survey, {"standard": a, "reversed": b}, mass=0.9)
    assert r.item_means[1] == 3.0 and r.item_means[7] == 3.5
    assert r.indices["PDI"] == pytest.approx(35 * 0.5 + DEFAULT_CONSTANT)
    assert set(r.per_presentation) == {"standard", "reversed"}


def test_table_shows_what_de_reached_and_flags_targets_outside():
    from culign.report import Row, format_table
    from culign.survey import SurveyResult
    from culign.targets import resolve

    us = resolve("US")
    result = SurveyResult({}, 0.9, {d: 50.0 for d in us.scores}, 0.3)
    seen = {d: [45.0, 60.0] for d in us.scores}
    table = format_table(us, [Row("de", result, us)], seen)
    assert "DE reached" in table and "45-60" in table
    note = next(line for line in table.splitlines() if line.startswith("note: targets outside"))
    assert "IDV 91 (max reached 60)" in note and "PDI 40 (min reached 45)" in note
    assert "UAI" not in note  # UAI 46 lies inside 45-60
    assert "DE reached" not in format_table(us, [Row("de", result, us)])
