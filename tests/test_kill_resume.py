"""Killed training resumes exactly: the real `culign train` CLI in a subprocess, on a small random Llama saved to a
folder with its tokenizer, SIGKILLed at 5 points and continued with --resume. The final adapter (sha256 of the
prompt tensor, loss, held-out loss, search history) must equal an uninterrupted run with the same seed, and no
half-written version may ever be listed by Registry.scan or `culign adapters list`.

Kill points are found by watching, not by sleeping: the progress bars on stderr (baselines), the checkpoint file and
its generation (search), the registry's temp folder (the save: CULIGN_REGISTRY_TEST_PAUSE_S holds the save just
before its rename) and the published version folder while the process is blocked writing its result table to a
full stdout pipe (after the save: nothing of the run is left to do but print).

One scenario (killed mid-search) runs in the default test run; `pytest -m reliability` runs all five.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from culign.registry import Registry

REGION = "US"
TRAIN_ARGS = ["--region", REGION, "--tokens", "4", "--dim", "8", "--popsize", "6", "--budget", "60", "--seed", "3",
              "--subset", "2", "--rotate-every", "2",
              "--train-presentation", "vsm/chat/asc", "--train-presentation", "terse/form/asc",
              "--train-presentation", "plain/inline/asc", "--no-validation",
              "--heldout", "formal/chat/asc", "--heldout", "vsm/chat/desc",
              "--readout", "digit", "--force-invalid"]  # the tiny random model fails the validity check, rightly
GENERATIONS = 10  # budget 60 / popsize 6
RUN_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random Llama wider than the unit tests' one (so each phase lasts long enough to be caught), saved with the
    word-level tokenizer, so `culign train --model <folder>` loads it like any local model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_word_tokenizer

    path = tmp_path_factory.mktemp("model")
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CULIGN_REGISTRY_TEST_PAUSE_S"}
    return {**env, "CULIGN_CACHE": str(tmp / "cache"), "CULIGN_ANSWER_CACHE": "0", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _cmd(model_dir: Path, work: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "culign.cli", "train", *TRAIN_ARGS, "--model", str(model_dir),
            "--checkpoint-dir", str(work / "ck"), "--adapters-dir", str(work / "reg"), "--progress", *(["--resume"] if resume else [])]


# ---------------------------------------------------------------------------------------------------- the watcher
@dataclass
class Watch:
    """What a run showed while it ran: its stderr, and every listing a concurrent reader made of the registry."""
    stderr: bytearray = field(default_factory=bytearray)
    listed: list[str] = field(default_factory=list)  # refs ever listed
    bad_listings: list[str] = field(default_factory=list)  # listed but not loadable: a half-written version seen

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace").replace("\r", "\n")


def _read_into(stream, buf: bytearray) -> None:
    while chunk := os.read(stream.fileno(), 65536):
        buf.extend(chunk)


def _scan_loop(reg: Registry, watch: Watch, stop: threading.Event) -> None:
    """A reader that lists the registry as fast as it can while training runs, and checks every listed version."""
    while not stop.is_set():
        for info in reg.scan()[0]:
            if info.ref not in watch.listed:
                watch.listed.append(info.ref)
                try:
                    reg.load(info.region, info.version)  # sha256 and shape: a listed version must be whole
                except Exception as e:  # noqa: BLE001
                    watch.bad_listings.append(f"{info.ref}: {e}")
        time.sleep(0.01)


def _full_stdout_pipe() -> tuple[int, int]:
    """A pipe whose buffer is already full: a child writing its stdout there blocks until killed."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, flags)  # the child must block, not fail, on its first write
    return r, w


def run_train(model_dir: Path, work: Path, *, resume: bool = False, kill_when=None, env_extra: dict | None = None,
              block_stdout: bool = False) -> tuple[Watch, int, str]:
    """Run `culign train`; with ``kill_when(work, watch, proc)`` returning a reason, SIGKILL it at that moment.

    Returns (watch, returncode, why it was killed or '')."""
    watch, stop = Watch(), threading.Event()
    reg = Registry(work / "reg")
    out_r = out_w = None
    if block_stdout:
        out_r, out_w = _full_stdout_pipe()
    proc = subprocess.Popen(_cmd(model_dir, work, resume), stdout=out_w if block_stdout else subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(work, **(env_extra or {})), cwd=work)
    if out_w is not None:
        os.close(out_w)
    threads = [threading.Thread(target=_read_into, args=(proc.stderr, watch.stderr), daemon=True),
               threading.Thread(target=_scan_loop, args=(reg, watch, stop), daemon=True)]
    if not block_stdout:
        threads.append(threading.Thread(target=_read_into, args=(proc.stdout, bytearray()), daemon=True))
    for t in threads:
        t.start()
    why, deadline = "", time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"culign train ran past {RUN_TIMEOUT} s:\n{watch.text[-3000:]}")
            if kill_when is not None and (why := kill_when(work, watch, proc)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        rc = proc.wait(timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if out_r is not None:
            os.close(out_r)
    return watch, rc, why


# ---------------------------------------------------------------------------------------------------- kill points
def _checkpoint(work: Path) -> dict | None:
    for p in (work / "ck").glob("*.json"):  # the checkpoint is replaced atomically; dot-temps are not matched
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None
    return None


def during_baselines(work, watch, proc):
    m = re.findall(r"baselines \(naive, persona\):.*?\| *(\d+)/(\d+)", watch.text)
    if m and 0 < int(m[-1][0]) < int(m[-1][1]):
        assert _checkpoint(work) is None
        return f"baselines {m[-1][0]}/{m[-1][1]}"
    return ""


def at_generation(n: int):
    def kill(work, watch, proc):
        ck = _checkpoint(work)
        if ck is not None and ck["generation"] >= n:
            return f"search, checkpoint at generation {ck['generation']} of {GENERATIONS}"
        return ""
    return kill


def during_save(work, watch, proc):
    tmps = [p for p in (work / "reg" / REGION).glob(".tmp-*") if (p / "culign.json").exists()]
    if tmps:
        return f"save: {tmps[0].name} written, not yet renamed"
    return ""


def after_save(work, watch, proc):
    published = work / "reg" / REGION / "1" / "culign.json"
    if published.exists():
        time.sleep(0.5)  # the child is blocked on its full stdout by now: the save and the checkpoint cleanup are done
        if proc.poll() is None:
            return f"after the save of {REGION}@1, blocked printing the table"
    return ""


# ---------------------------------------------------------------------------------------------------- results
def _final(work: Path) -> dict:
    reg = Registry(work / "reg")
    info = reg.resolve(REGION)
    loaded = reg.load(REGION, info.version)
    report = json.loads((info.path / "report.json").read_text())
    return {"ref": info.ref,
            "prompt_sha256": hashlib.sha256(loaded.prompt.contiguous().numpy().tobytes()).hexdigest(),
            "weights_sha256": loaded.provenance["weights_sha256"], "loss": loaded.provenance["loss"],
            "heldout_loss": loaded.provenance["heldout_loss"], "evaluations": report["evaluations"],
            "history": report["history"], "generations": report["generations"],
            "interrupted": report["interrupted"]}


def _same(a: dict, b: dict) -> dict:
    keys = ("prompt_sha256", "weights_sha256", "loss", "heldout_loss", "evaluations", "history", "generations",
            "interrupted")
    return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reference")
    watch, rc, _ = run_train(model_dir, work)
    assert rc == 0, watch.text[-3000:]
    assert watch.bad_listings == []
    return _final(work)


def _cli_list(work: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "culign.cli", "adapters", "list", "--json", "--adapters-dir",
                        str(work / "reg")], capture_output=True, text=True, env=_env(work), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


SCENARIOS = {
    # name: (list of (kill condition, extra env, blocked stdout) for successive runs before the final --resume)
    "baselines": [(during_baselines, {}, False)],
    "search-early": [(at_generation(2), {}, False)],
    "search-twice": [(at_generation(3), {}, False), (at_generation(7), {}, False)],  # a resumed run killed again
    "save": [(during_save, {"CULIGN_REGISTRY_TEST_PAUSE_S": "3"}, False)],
    "after-save": [(after_save, {}, True)],
}
QUICK = {"search-early"}  # the default run's subset


pytestmark = pytest.mark.reliability


def _scenario_params():
    return [pytest.param(name, marks=pytest.mark.reliability_quick if name in QUICK else ()) for name in SCENARIOS]


@pytest.mark.parametrize("scenario", _scenario_params())
def test_killed_training_resumes_exactly(model_dir, reference, tmp_path, scenario, record_property):
    work = tmp_path
    kills = []
    for n, (condition, env, block) in enumerate(SCENARIOS[scenario]):
        watch, rc, why = run_train(model_dir, work, resume=n > 0, kill_when=condition, env_extra=env,
                                   block_stdout=block)
        assert why, f"{scenario}: the run ended (rc {rc}) before its kill point:\n{watch.text[-2000:]}"
        assert rc == -signal.SIGKILL
        assert watch.bad_listings == [], watch.bad_listings
        kills.append(why)
        listed = _cli_list(work)
        for a in listed["adapters"]:  # whatever is listed after a kill is whole: it loads and verifies
            Registry(work / "reg").load(a["region"], a["version"])
        if scenario == "save":
            assert listed["adapters"] == [] and listed["warnings"] == []  # the dot-folder is not even a warning
            assert list((work / "reg" / REGION).glob(".tmp-*"))
        if scenario == "after-save":
            assert [a["ref"] for a in listed["adapters"]] == [f"{REGION}@1"]
            assert _same(_final(work), reference) == {}  # the version saved before the kill is the right one
    watch, rc, _ = run_train(model_dir, work, resume=True)
    assert rc == 0, watch.text[-3000:]
    assert watch.bad_listings == [], watch.bad_listings
    final = _final(work)
    record_property("kill_points", "; ".join(kills))
    assert _same(final, reference) == {}, f"resume after {kills} differs from the uninterrupted run"
    if scenario != "after-save":
        assert final["ref"] == f"{REGION}@1"  # a killed run never published a version of its own
    else:
        assert final["ref"] == f"{REGION}@2"  # the resumed run (checkpoint gone: run afresh) saves the same again
    listed = _cli_list(work)
    assert listed["warnings"] == []
    assert all(Registry(work / "reg").load(a["region"], a["version"]) for a in listed["adapters"])
    if out := os.environ.get("CULIGN_RELIABILITY_OUT"):  # the suite's summary table (reliability/)
        with open(out, "a") as f:
            f.write(json.dumps({"part": "kill-resume", "scenario": scenario, "killed": kills, "final": final["ref"],
                                "loss": final["loss"], "prompt_sha256": final["prompt_sha256"][:16],
                                "exact": True}) + "\n")
