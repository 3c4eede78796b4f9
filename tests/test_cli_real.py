"""`culign eval` and `culign regions` end to end, on the real embedded SmolLM2 (a subprocess, as users run it)."""
import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def culign(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "culign.cli", *args], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"culign {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def test_eval_us_json_naive_and_icl():
    out = json.loads(culign("eval", "--region", "US", "--icl", "--json").stdout)
    assert out["target"]["key"] == "US" and out["model"].startswith("embedded:")
    naive, icl = out["rows"]
    assert naive["label"] == "naive" and icl["label"] == "icl"
    for row in (naive, icl):
        assert set(row["indices"]) == {"PDI", "IDV", "MAS", "UAI", "LTO", "IVR"}
        assert all(math.isfinite(v) for v in row["indices"].values())
        assert row["option_mass"] > 0.5  # the "Answer: " prefill keeps the model on the options
        assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert naive["indices"] != icl["indices"]


def test_eval_table_and_presentations():
    p = culign("eval", "--region", "india", "--presentation", "reversed", "--presentation", "inline")
    assert "India (IN)" in p.stdout and "naive" in p.stdout and "L1" in p.stdout


def test_bad_input_is_a_usage_error():
    p = culign("eval", "--region", "Chna", check=False)
    assert p.returncode == 2 and "CN (China)" in p.stderr and "Traceback" not in p.stderr
    p = culign("eval", "--target", "PDI=abc", check=False)
    assert p.returncode == 2 and "PDI=abc" in p.stderr
    p = culign("eval", "--region", "US", "--model", "/nonexistent/model", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr


def test_regions_lists_the_table():
    rows = json.loads(culign("regions", "--json").stdout)
    assert len(rows) == 111
    sa = next(r for r in rows if r["key"] == "SA")
    assert sa["scores"]["PDI"] == 95


def test_train_then_eval_the_adapter(tmp_path):
    """The main job end to end on a small budget: report, adapter in the registry, and `eval` agreeing with it."""
    reg = tmp_path / "adapters"
    p = culign("train", "--region", "US", "--budget", "32", "--popsize", "16", "--adapters-dir", str(reg), "--json",
               "--checkpoint-dir", str(tmp_path / "runs"))
    report = json.loads(p.stdout)
    assert report["evaluations"] == 32 and set(report["rows"]) == {"naive", "icl", "de"}
    assert report["loss"] <= report["rows"]["de"]["loss"] + 1e-9
    assert report["heldout_loss"] is not None and report["option_mass"] > 0.5
    assert (reg / "US" / "1" / "radar.png").exists() and (reg / "US" / "1" / "adapter_config.json").exists()
    listed = json.loads(culign("adapters", "--adapters-dir", str(reg), "list", "--json").stdout)["adapters"]
    assert [(a["region"], a["version"]) for a in listed] == [("US", 1)]
    ev = json.loads(culign("eval", "--region", "US", "--adapter", str(reg / "US" / "1"), "--json").stdout)
    de_row = ev["rows"][-1]
    assert de_row["label"] == "US@1"
    # the same prompt scored alone instead of in a population batch: scoring is batch-invariant, so exactly equal
    assert de_row["loss"] == report["loss"] and de_row["indices"] == report["rows"]["de"]["indices"]
    assert culign("adapters", "--adapters-dir", str(reg), "verify", "--model", "embedded").returncode == 0
