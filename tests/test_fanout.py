"""`culign train --regions` on a real local Ray cluster (2 nodes, 1 CPU each, started here, joined over 127.0.0.1):
a fan-out equals the same regions trained one after another bit for bit, a SIGKILLed worker is retried and
resumes from its checkpoint to the same adapter, checkpoints and adapters can live on S3, and bad inputs are
usage errors that write nothing."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # culign.fanout.LOOPBACK_ENV: before ray is imported
ray = pytest.importorskip("ray")

from culign.fanout import (LiveLines, RegionJob, Status, fan_out, kill_task_worker, run_sequential,  # noqa: E402
                           status_line)
from culign.optimize import SearchConfig  # noqa: E402
from culign.survey import Split  # noqa: E402
from culign.targets import resolve  # noqa: E402
from culign.trainer import TrainSettings  # noqa: E402
from reliability.backends import ray_cluster  # noqa: E402

pytestmark = pytest.mark.ray
# the tiny random model fails the validity check, as it should: the CLI runs are forced (and marked so)
PRESENTATIONS = ["--train-presentation", "vsm/chat/asc", "--no-validation", "--heldout", "vsm/chat/desc",
                 "--readout", "digit", "--force-invalid"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Llama with the word tokenizer, saved as a model folder a Ray worker loads by path."""
    from conftest import build_tiny_model, build_word_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_word_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(nodes=2, cpus_per_node=1) as address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            yield address
        finally:
            ray.shutdown()


def _settings(budget=16, popsize=8) -> TrainSettings:
    split = Split(train=("vsm/chat/asc",), heldout={"order:desc": ("vsm/chat/desc",)})
    return TrainSettings(search=SearchConfig(tokens=2, dim=4, popsize=popsize, budget=budget, subset=0, seed=3),
                         split=split)


def _job(region, model, adapters, tmp_path, **kw):
    return RegionJob(resolve(region), kw.pop("settings", _settings()), str(adapters), model, "cpu", "float32",
                     checkpoint_dir=str(tmp_path / "ck"), threads=1, **kw)


def _report(result) -> dict:
    return json.loads((Path(result.adapter_path) / "report.json").read_text())


def _weights(result) -> bytes:
    return (Path(result.adapter_path) / "adapter_model.safetensors").read_bytes()


def test_fanout_equals_sequential_bit_for_bit(cluster, tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    try:
        seq = run_sequential([_job(r, tiny_model_dir, tmp_path / "seq", tmp_path / "s") for r in ("US", "CN")])
    finally:
        torch.set_num_threads(threads)
    fan = fan_out([_job(r, tiny_model_dir, tmp_path / "fan", tmp_path / "f") for r in ("US", "CN")],
                  ray_address=cluster, cpus_per_region=1)
    assert [r.ok for r in seq + fan] == [True] * 4, [r.error for r in seq + fan]
    assert [r.adapter for r in fan] == ["US@1", "CN@1"]
    for a, b in zip(seq, fan):
        assert _weights(a) == _weights(b), a.region
        assert (a.train_loss, a.heldout_loss) == (b.train_loss, b.heldout_loss)


def test_a_killed_worker_is_retried_and_resumes_to_the_same_adapter(cluster, tiny_model_dir, tmp_path, monkeypatch):
    settings = _settings(budget=48, popsize=8)  # 6 generations
    threads = torch.get_num_threads()
    try:
        (alone,) = run_sequential([_job("IN", tiny_model_dir, tmp_path / "alone", tmp_path / "a",
                                        settings=settings)])
    finally:
        torch.set_num_threads(threads)
    job = _job("IN", tiny_model_dir, tmp_path / "fan", tmp_path / "f", settings=settings)
    res, killed = _run_and_kill(job, cluster, at_generation=2)
    assert killed, "the worker was never killed"
    assert res.ok, res.error
    assert res.attempts == 2  # Ray retried the task once, on a fresh worker
    assert _weights(res) == _weights(alone)
    assert res.train_loss == alone.train_loss
    prov = json.loads((Path(res.adapter_path) / "culign.json").read_text())
    assert prov["report"]["resumed_from_generation"] >= 2  # it did resume, not start over


def test_no_more_regions_run_at_once_than_the_cluster_has_cpus_for(cluster, tiny_model_dir, tmp_path):
    """Three 1-CPU regions on 2 CPUs: at most two run at any moment. A task that blocked on ray.get (it once did, to
    learn its attempt number) handed its CPU back while it waited, and Ray started the third region on it."""
    os.environ["CULIGN_FANOUT_TEST_PAUSE_S"] = "0.5"  # each region runs a few seconds, long enough to overlap
    try:
        res = fan_out([_job(r, tiny_model_dir, tmp_path / "reg", tmp_path / r, settings=_settings(budget=32))
                       for r in ("US", "CN", "IN")], ray_address=cluster, cpus_per_region=1)
    finally:
        os.environ.pop("CULIGN_FANOUT_TEST_PAUSE_S", None)
    assert all(r.ok for r in res), [r.error for r in res]
    spans = [(r.started_at, r.started_at + r.wall_s) for r in res]
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most == 2, spans  # two at once (the cluster has two CPUs), never three


def test_the_live_lines_show_the_stages_before_and_after_the_search(tiny_model_dir, tmp_path):
    """A 1.5B model spends half an hour on the baselines before its first generation: the line says how far they
    are, then the generations, then the result's scoring; on a pipe a stage prints at each tenth, not per step."""
    seen = []
    threads = torch.get_num_threads()
    settings = _settings()
    settings.split = Split(train=("vsm/chat/asc",), validation={"wording:casual": ("casual/chat/asc",)},
                           heldout={"order:desc": ("vsm/chat/desc",)})
    try:
        (res,) = run_sequential([_job("US", tiny_model_dir, tmp_path / "reg", tmp_path / "ck", settings=settings)],
                                on_update=lambda sts: seen.append(status_line(sts["US"])))
    finally:
        torch.set_num_threads(threads)
    assert res.ok, res.error
    # the split has 3 presentations: naive and persona on each, then the search's 2 generations, the pick among its
    # elites on the validation one, then the result alone on all 3 (afresh, as `culign eval` scores it: the
    # report's numbers are the ones eval gives), then the line says how it ended
    assert [ln.split(None, 1)[1] for ln in seen[:6]] == [f"running  baselines {i}/6" for i in range(1, 7)]
    assert any("gen 2/2  best L1" in ln for ln in seen), seen
    picks = [ln for ln in seen if "picking on validation" in ln]
    elites = len(_report(res)["elites"])
    assert picks == [f"US       running  picking on validation {i}/{elites}" for i in range(elites + 1)], seen
    assert seen[-4:-1] == [f"US       running  scoring the result {i}/3" for i in range(1, 4)]
    assert seen[-1].startswith(f"US       done     held-out L1 {res.heldout_loss:.2f}  {res.verdict}  "), seen[-1]

    out = io.StringIO()
    lines = LiveLines(out)
    for done in range(1, 89):
        lines({"US": Status("US", "running", stage="baselines", stage_done=done, stage_total=88)})
    printed = out.getvalue().splitlines()
    assert printed[0] == "US       running  baselines 1/88" and printed[-1] == "US       running  baselines 88/88"
    assert len(printed) == 11  # 1/88, then each tenth: 9/88, 18/88, ..., 88/88


def test_a_failing_region_is_reported_while_the_others_finish(cluster, tiny_model_dir, tmp_path):
    good = _job("US", tiny_model_dir, tmp_path / "reg", tmp_path / "g")
    bad = _job("CN", str(tmp_path / "no-such-model"), tmp_path / "reg", tmp_path / "b")
    res = fan_out([good, bad], ray_address=cluster, cpus_per_region=1)
    assert res[0].ok and not res[1].ok
    assert "no-such-model" in res[1].error


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "culign.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_cli_regions_on_the_cluster(cluster, tiny_model_dir, tmp_path):
    reg = tmp_path / "reg"
    # the driver samples the regions' state every 0.5 s: a 1 s pause after each generation lets it see one
    r = _cli("train", "--regions", "US,CN", "--ray-address", cluster, "--model", tiny_model_dir, "--tokens", "2",
             "--dim", "4", "--popsize", "8", "--budget", "16", "--adapters-dir", str(reg), "--checkpoint-dir",
             str(tmp_path / "ck"), *PRESENTATIONS, env={"CULIGN_FANOUT_TEST_PAUSE_S": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "US@1" in r.stdout and "CN@1" in r.stdout and "gain kept" in r.stdout
    for region in ("US", "CN"):  # the live lines (on a pipe: one per change): generations, best loss, ETA, the end
        assert any(ln.startswith(region) and "running  gen " in ln and "/2  best L1" in ln and "ETA" in ln
                   for ln in r.stderr.splitlines()), r.stderr[-2000:]
        assert any(ln.startswith(region) and " done " in ln and "held-out L1" in ln for ln in r.stderr.splitlines())
    assert sorted(p.parent.name for p in reg.glob("*/1")) == ["CN", "US"]
    r = _cli("train", "--regions", "US,CN", "--ray-address", cluster, "--model", tiny_model_dir, "--tokens", "2",
             "--dim", "4", "--popsize", "8", "--budget", "16", "--adapters-dir", str(reg), "--json",
             "--no-progress", *PRESENTATIONS)
    assert [x["adapter"] for x in json.loads(r.stdout)] == ["US@2", "CN@2"]


@pytest.mark.parametrize("args,words", [
    (["--regions", "US,Narnia"], "unknown region 'Narnia'"),
    (["--regions", "@/no/such/file"], "cannot read"),
    (["--regions", ""], "no region"),
    (["--regions", "US", "--region", "CN"], "not both"),
    (["--regions", "US", "--ray-address", "127.0.0.1:9"], "no Ray cluster at 127.0.0.1:9"),
    (["--regions", "US", "--ray-address", "nonsense"], "HOST:PORT"),
])
def test_bad_fanout_input_is_a_usage_error_and_writes_nothing(args, words, tmp_path):
    reg = tmp_path / "reg"
    r = _cli("train", *args, "--adapters-dir", str(reg), "--no-progress", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not reg.exists()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    from reliability.backends import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("weed")) as server, server.exported():  # travels to the tasks
        server.make_bucket("fanout")
        yield server


def _run_and_kill(job, cluster, at_generation):
    """Fan out one job and SIGKILL its worker once the search has checkpointed ``at_generation`` generations. The
    test seam makes each generation wait 0.5 s, so the kill lands mid-run and not after the last one."""
    boards, killed = [], {}
    t = threading.Thread(target=_kill_at, args=(boards, job.target.key, at_generation, killed), daemon=True)
    t.start()
    os.environ["CULIGN_FANOUT_TEST_PAUSE_S"] = "0.5"
    try:
        (res,) = fan_out([job], ray_address=cluster, cpus_per_region=1, started=boards.append)
    finally:
        os.environ.pop("CULIGN_FANOUT_TEST_PAUSE_S", None)
    t.join(5)
    return res, killed


def _kill_at(boards, region, generation, killed):
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        if boards:
            snap = ray.get(boards[0].snapshot.remote()).get(region, {})
            if snap.get("generation", 0) >= generation and snap.get("attempt") == 1:
                kill_task_worker(snap["pid"])
                killed.update(snap)
        time.sleep(0.05)


@pytest.mark.s3
def test_checkpoints_and_adapters_on_s3_survive_a_killed_worker(cluster, s3, tiny_model_dir, tmp_path):
    """Nothing shared on disk: the registry and the checkpoints are S3 URLs, the retry reads the checkpoint back."""
    from culign.registry import open_registry

    settings = _settings(budget=40, popsize=8)
    threads = torch.get_num_threads()
    try:
        (alone,) = run_sequential([_job("SA", tiny_model_dir, tmp_path / "alone", tmp_path / "a", settings=settings)])
    finally:
        torch.set_num_threads(threads)
    job = RegionJob(resolve("SA"), settings, "s3://fanout/adapters", tiny_model_dir, "cpu", "float32",
                    checkpoint_dir="s3://fanout/checkpoints", threads=1)
    res, killed = _run_and_kill(job, cluster, at_generation=2)
    assert killed and res.ok and res.attempts == 2, (killed, res)
    loaded = open_registry("s3://fanout/adapters", cache_dir=tmp_path / "c").load("SA")
    assert loaded.info.ref == res.adapter == "SA@1"
    assert loaded.provenance["report"]["resumed_from_generation"] >= 2
    assert (Path(alone.adapter_path) / "adapter_model.safetensors").read_bytes() == \
        (loaded.info.path / "adapter_model.safetensors").read_bytes()
    import s3fs

    assert s3fs.S3FileSystem(skip_instance_cache=True).glob("fanout/checkpoints/SA-*") == []  # done: cleaned


# Passes alone and with this module (`pytest tests/test_fanout.py`, `make reliability`); inside the whole default run
# the CLI finished as if the SIGINT never reached it (2026-12-04, not yet diagnosed), so it runs with the
# reliability suite rather than in the default run.
@pytest.mark.reliability
def test_ctrl_c_keeps_every_checkpoint_and_resume_finishes_them(cluster, tiny_model_dir, tmp_path):
    import signal

    reg, ck = tmp_path / "reg", tmp_path / "ck"
    args = ["train", "--regions", "US,CN", "--ray-address", cluster, "--model", tiny_model_dir, "--tokens", "2",
            "--dim", "4", "--popsize", "8", "--budget", "48", "--adapters-dir", str(reg), "--checkpoint-dir",
            str(ck), "--no-progress", "--json", *PRESENTATIONS]
    def sigint_as_a_terminal_sends_it():
        # a library in this test process may ignore or block SIGINT, and a child inherits both (Python then never
        # raises KeyboardInterrupt): the CLI must start as it does from a shell
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "culign.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CULIGN_FANOUT_TEST_PAUSE_S": "1"},
                            preexec_fn=sigint_as_a_terminal_sends_it)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(ck.glob("*.json"))) < 2:
        time.sleep(0.2)
    # both regions must be mid-search when the signal comes; if they never ran at once (a cluster short of CPUs
    # runs them one after the other), say so rather than fail later on what the CLI printed
    assert len(list(ck.glob("*.json"))) == 2, (f"never 2 checkpoints at once: {sorted(p.name for p in ck.iterdir())}"
                                               f"; CLI alive: {proc.poll() is None}")
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    assert sorted(p.name.split("-")[0] for p in ck.glob("*.json")) == ["CN", "US"]  # both checkpoints kept
    r = _cli("train", *args[1:], "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads(r.stdout)
    assert all(x["ok"] and not x["interrupted"] for x in done)
    assert not list(ck.glob("*.json"))  # finished runs clean up their checkpoints
