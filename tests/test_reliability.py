"""Reliability, in-process (fast, in the default run): the registry's version-folder rule and refusal reasons, the
registry root that no region or version string escapes, and user data files validated with errors naming the line.

The live-server part of the suite (hostile HTTP corpus, load, disconnects, faults) is reliability/ and
tests/test_reliability_live.py; killed training is tests/test_kill_resume.py.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from culign.cli import main
from culign.regions import BadRegionSpec, parse_region
from culign.registry import AdapterCorrupt, AdapterNotFound, Registry, RegistryError, ScanWarning

pytestmark = [pytest.mark.reliability, pytest.mark.reliability_quick]  # in-process and fast: always run

HOSTILE_REFS = ["..", "../US", "US/..", "US/1", "/etc", "/tmp/out/OUT", "%2e%2e", "%2e%2e%2fOUT", "..%2fOUT",
                "US@-1", "US@1.0", "US@0", "US@01", "US@+1", "US@1@2", "US@", "@1", "US@99999999999", "US\n",
                "US\x00", " US", "U S", "\u0555S", "\uff35\uff33", "U\u0405", "\u212aR", "US\u200b", "~", ".",
                "OUT/../US", "x" * 65, "US@1e0", "US@0x1", "US@\u0661"]


def _prompt(seed: int = 0, n: int = 3, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _save(reg: Registry, region: str = "US", seed: int = 0):
    return reg.save(region, _prompt(seed), base_model="tiny", base_fingerprint="sha256:abc", provenance={"seed": seed})


def cli(root, *args):
    return CliRunner().invoke(main, ["adapters", "--adapters-dir", str(root), *args])


# ---------------------------------------------------------------------------------------------------- one rule
def test_a_version_folder_copied_to_a_new_number_is_refused_by_scan_load_and_verify(tmp_path):
    reg = Registry(tmp_path / "reg")
    _save(reg)
    shutil.copytree(tmp_path / "reg" / "US" / "1", tmp_path / "reg" / "US" / "2")  # cp -r US/1 US/2

    infos, warnings = reg.scan()
    assert [i.ref for i in infos] == ["US@1"]
    [w] = warnings
    assert isinstance(w, ScanWarning) and w.ref == "US@2" and w.kind == "copy" and w.version == 2
    assert w.startswith("US@2 refused as a copy") and "says version 1 but the folder is 2" in w
    with pytest.raises(AdapterCorrupt, match=r"US@2 is refused as a copy.*version 1"):
        reg.load("US", 2)
    assert reg.resolve("US").ref == "US@1" and reg.versions("US") == [1]  # the latest is the real one
    assert any("copy" in p for p in reg.verify("US", 2))

    r = cli(reg.root, "list")
    assert r.exit_code == 0 and "US@1" in r.output and "US@2" not in r.stdout and "US@2 refused as a copy" in r.stderr
    r = cli(reg.root, "verify")
    assert r.exit_code == 1 and "US@1: ok" in r.output and "US@2: FAILED: US@2 refused as a copy" in r.output
    r = cli(reg.root, "verify", "US@2")
    assert r.exit_code == 1 and "copy" in r.output
    assert json.loads(cli(reg.root, "list", "--json").output)["warnings"][0].startswith("US@2 refused as a copy")


def test_a_version_folder_copied_to_another_region_is_refused(tmp_path):
    reg = Registry(tmp_path)
    _save(reg)
    shutil.copytree(tmp_path / "US", tmp_path / "JP")
    infos, [w] = reg.scan()
    assert [i.ref for i in infos] == ["US@1"] and w.ref == "JP@1" and w.kind == "copy" and "region 'US'" in w
    with pytest.raises(AdapterCorrupt, match="JP@1 refused as a copy"):
        reg.load("JP")


@pytest.mark.parametrize("damage,kind,why", [
    ("truncate", "corrupt", "truncated"),
    ("garble", "corrupt", "culign.json is unreadable"),
    ("no-weights", "incomplete", "adapter_model.safetensors is missing"),
    ("no-provenance", "incomplete", "culign.json is missing"),
    ("empty-folder", "incomplete", "culign.json is missing"),
])
def test_scan_warnings_name_the_adapter_and_why(tmp_path, damage, kind, why):
    reg = Registry(tmp_path)
    _save(reg, seed=0)
    path = _save(reg, seed=1).path
    weights, prov = path / "adapter_model.safetensors", path / "culign.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garble":
        prov.write_text('{"region": "US", "vers')
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "no-provenance":
        prov.unlink()
    else:
        shutil.rmtree(path)
        path.mkdir()
    infos, [w] = reg.scan()
    assert [i.ref for i in infos] == ["US@1"]
    assert (w.ref, w.kind) == ("US@2", kind) and why in w.reason and str(path) in w
    assert w.startswith(f"US@2 refused as {'corrupt' if kind == 'corrupt' else 'incomplete'}")
    with pytest.raises(AdapterCorrupt, match=f"US@2 is refused as {kind}"):
        reg.load("US", 2)
    assert reg.load("US").info.ref == "US@1"  # the latest readable one serves
    r = cli(tmp_path, "verify")
    assert r.exit_code == 1 and f"US@2: FAILED: US@2 refused as" in r.output and why in r.output


def test_committed_registry_follows_the_rule():
    infos, warnings = Registry("adapters").scan()
    assert warnings == [] and {i.ref for i in infos} >= {"US@1", "US@2", "CN@1", "SA@1", "IN@1"}


# ---------------------------------------------------------------------------------------------------- the root
@pytest.fixture()
def fenced(tmp_path):
    """A registry at tmp/reg with US@1, and a valid adapter OUT@1 just outside it (tmp/OUT) that must stay unseen."""
    reg = Registry(tmp_path / "reg")
    _save(reg)
    _save(Registry(tmp_path), region="OUT", seed=9)
    (tmp_path / "reg" / "US" / "1" / "..x").mkdir()  # a dot entry inside a version must not matter either
    return reg, tmp_path


@pytest.mark.parametrize("ref", HOSTILE_REFS)
def test_no_region_string_escapes_the_registry_root(fenced, ref):
    reg, outside = fenced
    with pytest.raises(BadRegionSpec):
        parse_region(ref, "X-Culign-Region")
    # The registry itself refuses them too (names are checked before any path is built).
    region, _, version = ref.partition("@")
    for call in (lambda: reg.load(region), lambda: reg.resolve(ref), lambda: reg.verify(region),
                 lambda: reg.remove(ref)):
        try:
            result = call()
        except (ValueError, RegistryError):
            continue
        # Only a plain, valid name may get past the checks, and then only US@1 inside the root can be found.
        got = getattr(result, "info", result)
        assert getattr(got, "ref", None) in (None, "US@1"), (ref, result)
    for args in (["show", ref], ["verify", ref], ["rm", ref, "--yes"]):
        r = cli(reg.root, *args)
        assert r.exit_code in (1, 2) and "Traceback" not in r.output, (args, r.output)
        assert "OUT" not in r.output.replace(ref, "") or "bad region" in r.output
    assert (outside / "OUT" / "1" / "culign.json").exists() and reg.versions("US") == [1]
    assert [i.ref for i in reg.scan()[0]] == ["US@1"]


@pytest.mark.parametrize("version", [-1, 0, 1.0, True, "1", "../1", 10 ** 12])
def test_bad_version_values_are_refused(fenced, version):
    reg, _ = fenced
    with pytest.raises((ValueError, AdapterNotFound)):
        reg.load("US", version)


def test_an_unknown_version_is_not_found_not_a_path(fenced):
    reg, _ = fenced
    with pytest.raises(AdapterNotFound, match="US@999 not found"):
        reg.load("US", 999)
    r = cli(reg.root, "show", "US@999")
    assert r.exit_code == 2 and "US@999 not found" in r.output


def test_a_symlinked_version_folder_out_of_the_root_is_refused(fenced):
    reg, outside = fenced
    (reg.root / "US" / "2").symlink_to(outside / "OUT" / "1")
    infos, warnings = reg.scan()
    assert [i.ref for i in infos] == ["US@1"] and warnings[0].ref == "US@2"
    assert warnings[0].kind in ("unsafe", "copy")
    with pytest.raises(RegistryError):
        reg.load("US", 2)


# ---------------------------------------------------------------------------------------------------- user data files
def _wording(**change):
    from culign.survey import Survey

    items = [{"id": it.id, "stem": it.stem, "text": it.text, "scale": {str(k): v for k, v in it.scale.items()}}
             for it in Survey.load().items]
    return {"name": "mine", "title": "Mine", "note": "test", "items": items, **change}


def _line_of_entry(text: str, n: int) -> int:
    """Line of the n-th '"id":' in an indent=1 dump (each item starts one line above its id)."""
    pos = [i for i in range(len(text)) if text.startswith('"id":', i)][n]
    return text.count("\n", 0, pos)


WORDING_CASES = {
    "text-wrong-type": (lambda d: d["items"][3].update({"text": 7}), r"item 4 \(line {line}\) at items\[3\]: 'text'"),
    "id-missing": (lambda d: d["items"][5].pop("id"), r"\(line {line}\) at items\[5\]: entry 6 .*integer 'id', got None"),
    "id-string": (lambda d: d["items"][5].update({"id": "6"}), r"at items\[5\]: .*got '6'"),
    "label-number": (lambda d: d["items"][2]["scale"].update({"3": 3}), r"item 3 .*at items\[2\]: the label for answer 3 "
                     r"must be a string, got 3"),
    "nul-in-text": (lambda d: d["items"][7].update({"text": "a\x00b"}), r"item 8 .*text contains a control character"),
    "stem-list": (lambda d: d["items"][0].update({"stem": ["x"]}), r"item 1 .*'stem'"),
    "section-number": (lambda d: d["items"][1].update({"section": 5}), r"item 2 .*'section' must be a string"),
    "title-number": (lambda d: d.update({"title": 5}), r"'title' must be a string"),
    "items-object": (lambda d: d.update({"items": {}}), r"'items' must be a list"),
    "entry-string": (lambda d: d["items"].__setitem__(4, "five"), r"at items\[4\]: entry 5 .*got 'five'"),
}


@pytest.mark.parametrize("case", list(WORDING_CASES))
def test_a_bad_wording_file_names_the_file_line_and_item(tmp_path, case):
    from culign.survey import Survey, SurveyDataError

    mutate, pattern = WORDING_CASES[case]
    d = _wording()
    path = tmp_path / "w.json"
    text_before = json.dumps(d, indent=1)
    mutate(d)
    text = json.dumps(d, indent=1)
    path.write_text(text)
    n = int(next(iter(__import__("re").findall(r"items\\\[(\d+)", pattern)), 0))
    line = _line_of_entry(text_before, n) if "{line}" in pattern else 0
    with pytest.raises(SurveyDataError, match=str(path).replace(".", r"\.") + ".*" + pattern.format(line=line)):
        Survey.load(wording_files=[path])
    r = CliRunner().invoke(main, ["presentations", "--wording-file", str(path)])
    assert r.exit_code == 2 and "--wording-file" in r.output and "Traceback" not in r.output


def test_a_wording_file_that_is_not_utf8_or_not_json_names_the_line(tmp_path):
    from culign.survey import Survey, SurveyDataError

    path = tmp_path / "w.json"
    text = json.dumps(_wording(), indent=1)
    path.write_bytes(text.encode().replace(b'"id": 9,', b'"id": 9, "x": "\xff\xfe",'))
    with pytest.raises(SurveyDataError, match=rf"w\.json: line {_line_of_entry(text, 8) + 1}: not UTF-8"):
        Survey.load(wording_files=[path])
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(SurveyDataError, match=r"w\.json: not valid JSON at line \d+, column \d+"):
        Survey.load(wording_files=[path])
    for junk in ("[]", "null", ""):
        path.write_text(junk)
        with pytest.raises(SurveyDataError, match=r"w\.json"):
            Survey.load(wording_files=[path])
    with pytest.raises(SurveyDataError, match="cannot read"):
        Survey.load(wording_files=[tmp_path / "nope.json"])


def test_a_good_targets_file_in_both_formats(tmp_path):
    from culign.targets import parse_custom

    (tmp_path / "t.json").write_text('{"PDI": 80, "idv": 20.5}')
    (tmp_path / "t.txt").write_text("# my target\nPDI=80\n\nIDV = 20.5, MAS=66  # three\n")
    (tmp_path / "s.json").write_text('{"name": "ignored", "scores": {"LTO": 10}}')
    assert parse_custom(f"@{tmp_path / 't.json'}").scores == {"PDI": 80.0, "IDV": 20.5}
    assert parse_custom(f"@{tmp_path / 't.txt'}", "mine").scores == {"PDI": 80.0, "IDV": 20.5, "MAS": 66.0}
    t = parse_custom(f"@{tmp_path / 's.json'}")
    assert t.scores == {"LTO": 10.0} and "PDI" in t.missing


TARGET_CASES = [
    ("t.json", '{\n "PDI": 80,\n "IDV": "twenty"\n}', r"t\.json, line 3, \$\.IDV: expected a number, got 'twenty'"),
    ("t.json", '{\n "PDI": 80,\n "XYZ": 1\n}', r"t\.json, line 3, \$\.XYZ: unknown dimension 'XYZ'"),
    ("t.json", '{\n "PDI": 80,\n "pdi": 1\n}', r"t\.json, line 3, \$\.pdi: dimension PDI given twice"),
    ("t.json", '{\n "PDI": NaN\n}', r"line 2, \$\.PDI: expected a finite number"),
    ("t.json", '{\n "PDI": true\n}', r"line 2, \$\.PDI: expected a number, got True"),
    ("t.json", '{\n "scores": {\n  "MAS": [1]\n }\n}', r"line 3, \$\.scores\.MAS: expected a number"),
    ("t.json", '{\n "scores": 5\n}', r"line 2, \$\.scores: must be an object"),
    ("t.json", '{\n "PDI": 80,\n', r"t\.json, line \d, column \d+: not valid JSON"),
    ("t.json", "{}", r"t\.json: no DIM=NUMBER scores"),
    ("t.txt", "PDI=80\nIDV=abc\n", r"t\.txt, line 2, term 'IDV=abc': expected DIM=NUMBER"),
    ("t.txt", "PDI=80\n\n# c\nFOO=1\n", r"t\.txt, line 4, term 'FOO=1': unknown dimension"),
    ("t.txt", "PDI=80, PDI=81\n", r"line 1, term 'PDI=81': dimension PDI given twice"),
    ("t.txt", "# nothing\n", r"t\.txt: no DIM=NUMBER"),
    ("t.txt", b"PDI=80\nIDV=\xff\n", r"t\.txt, line 2: not UTF-8"),
    ("t.txt", "PDI=1\n" * 20000, r"larger than 65536 bytes"),
]


@pytest.mark.parametrize("name,content,pattern", TARGET_CASES)
def test_a_bad_targets_file_names_the_file_line_and_item(tmp_path, name, content, pattern):
    from culign.targets import TargetFileError, parse_custom

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TargetFileError, match=pattern):
        parse_custom(f"@{path}")
    r = CliRunner().invoke(main, ["eval", "--target", f"@{path}"])
    assert r.exit_code == 2 and "--target" in r.output and "Traceback" not in r.output
    assert name in r.output


def test_a_missing_targets_file_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["train", "--target", f"@{tmp_path / 'nope.json'}"])
    assert r.exit_code == 2 and "nope.json: cannot read the targets file" in r.output
