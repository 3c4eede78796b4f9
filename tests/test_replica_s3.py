"""A service replica serving from an S3 registry (real SeaweedFS, real `bentoml serve`): a new version is served
within CULIGN_RESCAN_SECONDS, the last good version keeps being served while the store is down (a warning once, a
metric, no 5xx), service recovers when the store returns, and a version without a manifest is never served."""
from __future__ import annotations

import time
import uuid

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("s3fs")

from culign.registry import CLAIM_FILE, S3Registry  # noqa: E402
from culign.registry import Registry  # noqa: E402
from reliability.backends import seaweedfs  # noqa: E402
from reliability.harness import REPO, serve  # noqa: E402

pytestmark = [pytest.mark.s3, pytest.mark.server, pytest.mark.real]
STAMPED = {"base_model", "base_fingerprint", "num_virtual_tokens", "token_dim", "dtype", "culign_version", "created",
           "weights_sha256", "region", "version"}


def _publish(reg: S3Registry, region: str, version: int):
    """A committed adapter (trained on the embedded model) published to the store as the next version."""
    a = Registry(REPO / "adapters").load(region, version)
    prov = {k: v for k, v in a.provenance.items() if k not in STAMPED}
    return reg.save(region, a.prompt, base_model=a.info.base_model, base_fingerprint=a.info.base_fingerprint,
                    provenance=prov)


def _served(server, region="US") -> tuple[int, str]:
    r = httpx.post(f"{server.url}/chat", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                   headers={"X-Culign-Region": region}, timeout=120)
    return r.status_code, r.headers.get("x-culign-adapter", "")


def _metric(server, name: str) -> float | None:
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _until(what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_a_replica_follows_the_store_and_survives_its_outage(tmp_path):
    with seaweedfs(tmp_path / "weed") as store, store.exported():
        store.make_bucket("replicas")
        url = f"s3://replicas/{uuid.uuid4().hex[:8]}"  # the replica's local cache is keyed by URL: a fresh one
        publisher = S3Registry(url, cache_dir=tmp_path / "publisher-cache")
        assert _publish(publisher, "US", 1).ref == "US@1"
        (tmp_path / "srv").mkdir()
        with serve(tmp_path / "srv", url, CULIGN_RESCAN_SECONDS=1, **store.env) as server:
            assert _served(server) == (200, "US@1")
            # a new version is served without a restart, within the rescan period
            assert _publish(publisher, "US", 2).ref == "US@2"
            assert _until(lambda: _served(server) == (200, "US@2"))
            # a claimed, half-uploaded version 3 (no manifest) is never served
            publisher.fs.pipe_file(f"{publisher.base}/US/3/{CLAIM_FILE}", b"{}")
            publisher.fs.pipe_file(f"{publisher.base}/US/3/adapter_model.safetensors", b"half")
            time.sleep(2.5)
            assert _served(server) == (200, "US@2")
            # the store goes away: the last good version is served, no 5xx, the metric says so
            store.stop()
            statuses = [_served(server) for _ in range(6)]
            assert statuses == [(200, "US@2")] * 6, statuses
            assert _until(lambda: _metric(server, "culign_registry_unreachable") == 1.0)
            assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
            assert server.log().count("serving the last good listing") == 1  # warned once per outage
            # ... and it comes back: the metric clears and a version published now is served
            store.start()
            assert _until(lambda: _served(server) and _metric(server, "culign_registry_unreachable") == 0.0, 60)
            assert _publish(publisher, "US", 1).ref == "US@4"  # 3 stays claimed, never reused
            assert _until(lambda: _served(server) == (200, "US@4"))
            assert "registry reachable again" in server.log()
            assert store.env["AWS_SECRET_ACCESS_KEY"] not in server.log()  # credentials never logged
