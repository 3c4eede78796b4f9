"""`culign adapters list|show|verify|rm`, `culign presentations` and `culign train` argument errors (no model)."""
import json

import pytest
import torch
from click.testing import CliRunner

from culign.cli import main
from culign.registry import Registry


@pytest.fixture()
def registry(tmp_path):
    reg = Registry(tmp_path / "adapters")
    for region, loss in (("US", 5.0), ("US", 4.0), ("CN", 7.5)):
        reg.save(region, torch.randn(4, 16), base_model="tiny", base_fingerprint="sha256:abc",
                 provenance={"loss": loss, "heldout_loss": loss + 3, "seed": 0, "de": {"popsize": 8}})
    return reg


def run(registry, *args):
    return CliRunner().invoke(main, ["adapters", "--adapters-dir", str(registry.root), *args])


def test_list_and_json(registry):
    r = run(registry, "list")
    assert r.exit_code == 0 and "US@1" in r.output and "US@2" in r.output and "CN@1" in r.output
    data = json.loads(run(registry, "list", "--json").output)
    assert [a["ref"] if "ref" in a else f"{a['region']}@{a['version']}" for a in data["adapters"]] == \
        ["CN@1", "US@1", "US@2"]
    assert data["warnings"] == []


def test_show_latest_and_version(registry):
    r = run(registry, "show", "US")
    assert r.exit_code == 0 and "US@2" in r.output and "4.0" in r.output
    prov = json.loads(run(registry, "show", "US@1", "--json").output)
    assert prov["version"] == 1 and prov["loss"] == 5.0
    r = run(registry, "show", "FR")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_verify_detects_corruption(registry):
    assert run(registry, "verify").exit_code == 0
    weights = registry.resolve("CN").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = run(registry, "verify")
    assert r.exit_code == 1 and "CN@1: FAILED" in r.output and "US@2: ok" in r.output


def test_rm_dry_run_then_one_version_then_region(registry):
    r = run(registry, "rm", "US", "--dry-run")
    assert r.exit_code == 0 and "would remove US@1" in r.output and registry.versions("US") == [1, 2]
    assert run(registry, "rm", "US@2", "--yes").exit_code == 0 and registry.versions("US") == [1]
    r = run(registry, "rm", "US")  # asks first; "n" keeps it
    assert r.exit_code == 1 and registry.versions("US") == [1]
    assert run(registry, "rm", "US", "--yes").exit_code == 0 and registry.regions() == ["CN"]


@pytest.mark.parametrize("args,msg", [
    (["--region", "US", "--popsize", "3"], "popsize"),
    (["--region", "US", "--mutation", "x"], "mutation"),
    (["--region", "Atlantis"], "unknown region"),
    (["--region", "US", "--target", "PDI=3"], "exactly one"),
    (["--region", "US", "--train-presentation", "standard", "--heldout-presentation", "standard"],
     "contains training"),
    (["--region", "US", "--budget", "16"], "budget"),
    (["--region", "US", "--robust", "median"], "robust aggregate"),
    (["--region", "US", "--optimizer", "sgd"], "optimizer"),
    (["--region", "US", "--train-presentation", "vsm/nope/asc"], "unknown template"),
])
def test_train_rejects_bad_arguments_before_loading_a_model(args, msg):
    r = CliRunner().invoke(main, ["train", *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_adapters_dir_after_the_subcommand_and_the_default_registry(registry, tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["adapters", "list", "--adapters-dir", str(registry.root)])
    assert r.exit_code == 0 and "US@2" in r.output
    r = CliRunner().invoke(main, ["adapters", "show", "US", "--adapters-dir", str(registry.root), "--json"])
    assert json.loads(r.output)["version"] == 2
    monkeypatch.chdir(tmp_path)  # no --adapters-dir, no CULIGN_ADAPTERS: the user's ./runs/adapters, never ./adapters
    monkeypatch.delenv("CULIGN_ADAPTERS", raising=False)
    r = CliRunner().invoke(main, ["adapters", "list"])
    assert r.exit_code == 0 and "no adapters in runs/adapters" in r.output
    monkeypatch.setenv("CULIGN_ADAPTERS", str(registry.root))
    assert "CN@1" in CliRunner().invoke(main, ["adapters", "list"]).output


def test_presentations_lists_the_split():
    r = CliRunner().invoke(main, ["presentations"])
    assert r.exit_code == 0 and "train (9)" in r.output and "held-out wording:formal" in r.output
    assert "no validation or held-out family shares" in r.output
    data = json.loads(CliRunner().invoke(main, ["presentations", "--json"]).output)
    assert data["leaks"] == [] and len(data["presentations"]) == 5 * 11 * 2 and "vsm" in data["wordings"]
    r = CliRunner().invoke(main, ["presentations", "--train-presentation", "formal/*/asc"])
    assert r.exit_code == 0 and "train (6)" in r.output and "held-out wording:formal" not in r.output  # 6 digit templates
    assert "template 'interview' appears in training" in r.output  # formal/interview/asc now trains: flagged


def test_a_bad_wording_file_is_a_usage_error_naming_the_item(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"name": "w", "items": [{"id": 1, "text": "x", "scale": ["a", "b", "c", "d", "e"]}]}))
    r = CliRunner().invoke(main, ["presentations", "--wording-file", str(bad)])
    assert r.exit_code == 2 and "missing" in r.output and "--wording-file" in r.output and "Traceback" not in r.output
