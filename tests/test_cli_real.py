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
    out = json.loads(culign("eval", "--region", "US", "--icl", "--json", "--no-validity", "--presentation", "standard",
                            "--presentation", "terse/form/asc").stdout)
    assert out["target"]["key"] == "US" and out["model"].startswith("embedded:")
    naive, icl = out["rows"]
    assert naive["label"] == "naive" and icl["label"] == "persona"
    for row in (naive, icl):
        assert set(row["indices"]) == {"PDI", "IDV", "MAS", "UAI", "LTO", "IVR"}
        assert all(math.isfinite(v) for v in row["indices"].values())
        assert row["option_mass"] > 0.5  # the prefills keep the model on the options
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert set(row["per_presentation"]) == {"vsm/chat/asc", "terse/form/asc"}
    assert naive["indices"] != icl["indices"]


def test_eval_table_and_presentations():
    p = culign("eval", "--region", "india", "--no-validity", "--presentation", "reversed", "--presentation", "inline")
    assert "India (IN)" in p.stdout and "naive" in p.stdout and "train" in p.stdout and "noise band" in p.stdout


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


SMALL_SPLIT = ["--train-presentation", "standard", "--train-presentation", "terse/form/asc",
               "--validation", "plain/chat/asc", "--heldout", "reversed", "--heldout", "formal/inline/asc"]


def test_train_then_eval_the_adapter(tmp_path):
    """The main job end to end on a small budget and split: report, adapter in the registry, and `eval` agreeing
    with it to the last bit (every reported number is the saved prompt scored alone, as `eval` scores it)."""
    reg = tmp_path / "adapters"
    p = culign("train", "--region", "US", "--budget", "32", "--popsize", "16", "--adapters-dir", str(reg), "--json",
               "--checkpoint-dir", str(tmp_path / "runs"), "--no-progress", *SMALL_SPLIT, check=False)
    # the embedded model fails the validity check: training refuses it, with the numbers, unless forced
    assert p.returncode == 2 and "does not pass the validity check" in p.stderr and "order slope" in p.stderr
    assert not reg.exists()
    p = culign("train", "--region", "US", "--budget", "32", "--popsize", "16", "--adapters-dir", str(reg), "--json",
               "--checkpoint-dir", str(tmp_path / "runs"), "--no-progress", "--force-invalid", *SMALL_SPLIT)
    report = json.loads(p.stdout)
    assert report["forced_invalid"] is True and report["readout"] == "digit"
    assert report["validity"]["digit"]["verdict"] != "follows meaning and culture"
    assert report["evaluations"] == 32 and set(report["rows"]) == {"naive", "persona", "adapter"}
    assert report["heldout_loss"] is not None and report["option_mass"] > 0.5
    assert set(report["heldout_by_family"]) == {"reversed", "formal/inline/asc"}
    assert report["selected_by"] == "validation"
    # the search's own number for the result is the same prompt scored in populations: equal up to rounding
    assert abs(report["objective"] - report["train_loss"]) < 1e-3
    for f in ("radar.png", "loss.png", "report.html", "adapter_config.json"):
        assert (reg / "US" / "1" / f).exists(), f
    assert "saved US@1" in p.stderr and "report.json" in p.stderr
    listed = json.loads(culign("adapters", "list", "--adapters-dir", str(reg), "--json").stdout)["adapters"]
    assert [(a["region"], a["version"]) for a in listed] == [("US", 1)]
    ev = json.loads(culign("eval", "--region", "US", "--adapter", str(reg / "US" / "1"), "--json").stdout)
    assert ev["readout"] == "digit" and ev["validity"]["digit"] == report["validity"]["digit"]  # from the cache
    assert ev["split"] == report["split"]  # eval takes the adapter's own split
    row = ev["rows"][-1]
    assert row["label"] == "US@1"
    assert row["loss"] == report["train_loss"] and row["heldout_loss"] == report["heldout_loss"]
    assert row["per_presentation"] == report["rows"]["adapter"]["per_presentation"]
    assert culign("adapters", "verify", "--adapters-dir", str(reg), "--model", "embedded").returncode == 0
