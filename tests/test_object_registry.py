"""The registry on a real S3 server: SeaweedFS (``weed server -s3``) started on 127.0.0.1 with a fresh data folder
and its own credentials. Publish / list / load / verify / rm, concurrent publishers, half-uploaded and corrupted
objects, and the CLI's errors for bad URLs, wrong credentials and an unreachable store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("s3fs")

from culign.registry import CLAIM_FILE, MANIFEST_FILE, RegistryUnavailable, S3Registry  # noqa: E402
from culign.registry import AdapterCorrupt, AdapterNotFound, Registry, open_registry  # noqa: E402
from reliability.backends import SECRET_KEY, seaweedfs  # noqa: E402

pytestmark = pytest.mark.s3
BUCKET = "culign-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("weed")) as server, server.exported():
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture()
def url(s3, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')[:60]}"


def _save(reg, region="US", seed=0, **extra):
    torch.manual_seed(seed)
    return reg.save(region, torch.randn(4, 16), base_model="tiny", base_fingerprint="fp-1",
                    provenance={"loss": 1.5, "seed": seed, **extra}, files={"report.json": b'{"x": 1}'})


def test_open_registry_picks_by_url(tmp_path, s3):
    assert isinstance(open_registry(tmp_path), Registry)
    assert isinstance(open_registry(f"file://{tmp_path}"), Registry)
    assert isinstance(open_registry(f"s3://{BUCKET}/x", cache_dir=tmp_path), S3Registry)
    for bad in ("s3://", "s3:///prefix", "s3://Upper_Case/x"):
        with pytest.raises(ValueError, match="bucket|URL"):
            S3Registry(bad, cache_dir=tmp_path)


def test_publish_list_load_verify_remove(url, tmp_path):
    reg = S3Registry(url, cache_dir=tmp_path / "cache")
    a = _save(reg, seed=0)
    b = _save(reg, seed=1)
    c = _save(reg, "CN", seed=2)
    assert (a.ref, b.ref, c.ref) == ("US@1", "US@2", "CN@1")
    infos, warnings = reg.scan()
    assert [i.ref for i in infos] == ["CN@1", "US@1", "US@2"] and warnings == []
    assert reg.regions() == ["CN", "US"] and reg.versions("us") == [1, 2]
    torch.manual_seed(1)
    want = torch.randn(4, 16)
    loaded = reg.load("US", hidden_size=16, base_fingerprint="fp-1")
    assert loaded.info.ref == "US@2" and torch.equal(loaded.prompt, want)
    assert loaded.provenance["seed"] == 1 and (loaded.info.path / "report.json").read_bytes() == b'{"x": 1}'
    # a second machine: its own empty cache reads the same bytes
    other = S3Registry(url, cache_dir=tmp_path / "other-cache")
    assert torch.equal(other.load("US", 2).prompt, want)
    assert reg.verify("US", 2, hidden_size=16) == []
    assert reg.verify("US", 2, hidden_size=32)  # a width mismatch is a problem
    removed = reg.remove("US", 1)
    assert [r.ref for r in removed] == ["US@1"] and reg.versions("US") == [2]
    with pytest.raises(AdapterNotFound):
        reg.load("US", 1)
    assert _save(reg, seed=3).ref == "US@3"  # a removed number is never reused (its claim stays)
    # the same files as a local version folder: PEFT-format, loadable by the local registry's own checks
    local = Registry(tmp_path / "cache").root
    assert any(local.rglob("adapter_config.json"))


def test_concurrent_publishers_never_share_a_version(url, tmp_path):
    refs, errors = [], []

    def publish(i):
        try:  # each its own client and cache, as on separate machines
            refs.append(_save(S3Registry(url, cache_dir=tmp_path / f"c{i}"), seed=i).ref)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(refs) == [f"US@{v}" for v in range(1, 7)]
    reg = S3Registry(url, cache_dir=tmp_path / "check")
    seeds = {i.version: reg.load("US", i.version).provenance["seed"] for i in reg.scan()[0]}
    assert sorted(seeds.values()) == list(range(6))  # six versions, six different prompts: none overwritten


def test_concurrent_publishing_processes(url, tmp_path):
    """Two processes, not threads: the create-only claim is what keeps them apart."""
    code = ("import sys, torch; from culign.registry import S3Registry as R; "
            "torch.manual_seed(int(sys.argv[2])); "
            "print(R(sys.argv[1], cache_dir=sys.argv[3]).save('IN', torch.randn(2, 8), base_model='t', "
            "base_fingerprint='f', provenance={}).ref)")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(i), str(tmp_path / f"p{i}")],
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for i in range(3)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["IN@1", "IN@2", "IN@3"]


def test_half_uploaded_and_corrupted_versions_are_never_served(url, tmp_path, s3):
    reg = S3Registry(url, cache_dir=tmp_path / "cache")
    good = _save(reg, seed=0)
    fs, base = reg.fs, reg.base
    # a publisher that died after claiming and uploading part of version 2: no manifest, not a version
    fs.pipe_file(f"{base}/US/2/{CLAIM_FILE}", b"{}")
    fs.pipe_file(f"{base}/US/2/adapter_model.safetensors", b"partial")
    assert [i.ref for i in reg.scan()[0]] == ["US@1"] and reg.scan()[1] == []
    assert reg.load("US").info.ref == "US@1"
    # version 3 is complete, then its weights are overwritten in the store (same size, other bytes)
    bad = _save(reg, seed=5)
    assert bad.ref == "US@3"
    key = f"{base}/US/3/adapter_model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fresh = S3Registry(url, cache_dir=tmp_path / "fresh")  # a replica that has not cached it yet
    infos, warnings = fresh.scan()
    assert [i.ref for i in infos] == ["US@1"]
    assert len(warnings) == 1 and warnings[0].ref == "US@3" and "sha256" in warnings[0].reason
    assert fresh.load("US").info.ref == "US@1"  # the latest *good* version
    with pytest.raises(AdapterCorrupt, match="US@3"):
        fresh.load("US", 3)
    # a file missing while the manifest lists it (half-uploaded and then cleaned by hand)
    fs.rm_file(f"{base}/US/1/report.json")
    assert "missing" in " ".join(S3Registry(url, cache_dir=tmp_path / "f2").scan()[1][0].reason for _ in [0])
    assert good.ref == "US@1"


def test_manifest_is_written_last_and_lists_every_file(url, tmp_path):
    reg = S3Registry(url, cache_dir=tmp_path / "cache")
    _save(reg)
    manifest = json.loads(reg.fs.cat_file(f"{reg.base}/US/1/{MANIFEST_FILE}"))
    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "culign.json",
                                      "report.json"}
    assert all(len(m["sha256"]) == 64 and m["size"] > 0 for m in manifest["files"].values())


def test_unreachable_store_and_wrong_credentials(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        S3Registry(f"s3://{BUCKET}/x", cache_dir=tmp_path).scan()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(RegistryUnavailable, match="credentials") as e:
        S3Registry(f"s3://{BUCKET}/x", cache_dir=tmp_path).scan()
    assert "wrong-secret" not in str(e.value) and SECRET_KEY not in str(e.value)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "culign.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_over_s3(url, tmp_path, s3):
    reg = S3Registry(url, cache_dir=tmp_path / "cache")
    _save(reg)
    r = _cli("adapters", "--adapters-dir", url, "list", "--json")
    assert r.returncode == 0, r.stderr
    assert [a["ref"] for a in json.loads(r.stdout)["adapters"]] == ["US@1"]
    r = _cli("adapters", "--adapters-dir", url, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("adapters", "list", env={"CULIGN_ADAPTERS": url})
    assert r.returncode == 0 and "US@1" in r.stdout


@pytest.mark.parametrize("args,env,words", [
    (["--adapters-dir", "s3://"], {}, "invalid registry URL"),
    (["--adapters-dir", "s3://No_Such/x"], {}, "invalid bucket"),
    (["--adapters-dir", "s3://culign-test/x"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "unreachable"),
    (["--adapters-dir", "s3://culign-test/x"], {"AWS_SECRET_ACCESS_KEY": "nope"}, "credentials"),
    (["--adapters-dir", "s3://no-such-bucket-here/x"], {}, "bucket"),
])
def test_cli_bad_stores_are_usage_errors(args, env, words, s3, tmp_path):
    r = _cli("adapters", *args, "list", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert "nope" not in r.stderr and SECRET_KEY not in r.stderr
    if "unreachable" in words:  # train checks the store before it loads a model: nothing trained or written
        r = _cli("train", "--region", "US", "--budget", "32", "--popsize", "16", "--no-progress", *args, env=env)
        assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr, r.stderr
