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
