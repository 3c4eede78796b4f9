"""Region lookup by code, alias and name; missing dimensions; custom targets; friendly errors."""
import pytest

from culign.targets import SAUDI_VARIANTS, TABLE, UnknownRegionError, parse_custom, resolve


@pytest.mark.parametrize("query", ["USA", "us", "U.S.A.", "united states", " US "])
def test_lookup_usa(query):
    t = resolve(query)
    assert t.key == "US" and t.scores == {"PDI": 40, "IDV": 91, "MAS": 62, "UAI": 46, "LTO": 26, "IVR": 68}


@pytest.mark.parametrize("query,key", [("CHI", "CN"), ("china", "CN"), ("IN", "IN"), ("India", "IN"),
                                       ("ARA", "ARA"), ("arab countries", "ARA"), ("Germany", "DE")])
def test_lookup_code_alias_name(query, key):
    assert resolve(query).key == key


def test_table_is_the_2015_matrix():
    assert len(TABLE) == 111
    assert resolve("CN").scores["LTO"] == 87


def test_saudi_arabia_gets_a_documented_full_row():
    assert resolve("SA").scores == SAUDI_VARIANTS["legacy"]
    assert resolve("Saudi Arabia", saudi_variant="almutairi2020").scores["IVR"] == 14
    with pytest.raises(ValueError):
        resolve("SA", saudi_variant="nope")


def test_missing_dimensions_are_explicit():
    alb = resolve("Albania")
    assert set(alb.scores) == {"LTO", "IVR"} and alb.missing == ("PDI", "IDV", "MAS", "UAI")


def test_unknown_region_suggests_close_matches():
    with pytest.raises(UnknownRegionError) as e:
        resolve("Chna")
    assert "CN (China)" in str(e.value)


def test_custom_target():
    t = parse_custom("PDI=80, idv=20,MAS=66.5")
    assert t.scores == {"PDI": 80, "IDV": 20, "MAS": 66.5} and "UAI" in t.missing
    for bad in ["PDI=abc", "XYZ=3", "PDI=1,PDI=2", ""]:
        with pytest.raises(ValueError):
            parse_custom(bad)
