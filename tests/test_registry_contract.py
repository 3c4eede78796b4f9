"""The contract every registry backend keeps, as one life of a registry run against each: a local folder and a real
S3 server (SeaweedFS on 127.0.0.1, started here). Save, list, resolve, verify, load with its checks, remove, and
concurrent publishers: a caller holding an :class:`AdapterRegistry` cannot tell which backend it has."""
from __future__ import annotations

import itertools
import threading
import uuid

import pytest
import torch

from culign.registry import (WEIGHTS_FILE, AdapterCorrupt, AdapterIncompatible, AdapterNotFound, AdapterRegistry,
                             S3Registry, open_registry)

HIDDEN = 16
FP = "sha256:base"
BUCKET = "culign-contract"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    pytest.importorskip("s3fs")
    from reliability.backends import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("weed")) as server, server.exported():
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def open_client(request, tmp_path):
    """Opens a new client of one registry at each call, as another process or machine would (its own cache)."""
    if request.param == "local":
        return lambda: open_registry(tmp_path / "registry")
    request.getfixturevalue("s3_server")
    url, caches = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", itertools.count()
    return lambda: open_registry(url, cache_dir=tmp_path / f"cache-{next(caches)}")


def _prompt(seed: int) -> torch.Tensor:
    return torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _save(reg, region: str, seed: int):
    return reg.save(region, _prompt(seed), base_model="tiny", base_fingerprint=FP, provenance={"seed": seed},
                    files={"report.json": b'{"x": 1}'})


def _tamper_weights(reg, region: str, version: int, change) -> None:
    """Replace a stored weights file with ``change(its bytes)``, behind the registry's back."""
    if isinstance(reg, S3Registry):
        key = f"{reg.base}/{region}/{version}/{WEIGHTS_FILE}"
        reg.fs.pipe_file(key, change(reg.fs.cat_file(key)))
    else:
        path = reg.root / region / str(version) / WEIGHTS_FILE
        path.write_bytes(change(path.read_bytes()))


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_registry_contract(open_client):
    reg = open_client()
    assert isinstance(reg, AdapterRegistry)

    # ---- save: numbers per region from 1; a region's spelling is the first save's, matched case-insensitively
    us1, us2, cn1 = _save(reg, "US", 1), _save(reg, "us", 2), _save(reg, "CN", 3)
    assert (us1.ref, us2.ref, cn1.ref) == ("US@1", "US@2", "CN@1")
    assert (us1.num_virtual_tokens, us1.token_dim, us1.base_model, us1.base_fingerprint) == (4, HIDDEN, "tiny", FP)

    # ---- list
    infos, warnings = reg.scan()
    assert [i.ref for i in infos] == ["CN@1", "US@1", "US@2"] and warnings == []
    assert reg.regions() == ["CN", "US"] and reg.versions("us") == [1, 2]

    # ---- resolve: the latest, or a number; unknown names say what exists
    assert reg.resolve("US") == us2 and reg.resolve("uS", 1) == us1
    with pytest.raises(AdapterNotFound, match="available regions: CN, US") as e:
        reg.resolve("DE")
    assert e.value.available == ["CN", "US"]
    with pytest.raises(AdapterNotFound, match="US@9"):
        reg.resolve("US", 9)

    # ---- load: the same prompt from any client, checked against the caller's model
    other = open_client()
    loaded = other.load("us", 1, hidden_size=HIDDEN, base_fingerprint=FP)
    assert loaded.info.ref == "US@1" and torch.equal(loaded.prompt, _prompt(1)) and loaded.provenance["seed"] == 1
    assert (loaded.info.path / "report.json").read_bytes() == b'{"x": 1}'
    assert torch.equal(reg.load("US").prompt, _prompt(2))
    with pytest.raises(AdapterIncompatible, match=r"US@1.*hidden size 32"):
        reg.load("US", 1, hidden_size=2 * HIDDEN, allow_base_mismatch=True)  # never overridable
    with pytest.raises(AdapterIncompatible, match=r"US@1.*sha256:other"):
        reg.load("US", 1, base_fingerprint="sha256:other")
    assert torch.equal(reg.load("US", 1, base_fingerprint="sha256:other", allow_base_mismatch=True).prompt, _prompt(1))

    # ---- verify: sound, then a weights file changed in place (same size) is found, and never loaded
    assert reg.verify("US", 2, hidden_size=HIDDEN, base_fingerprint=FP) == []
    assert len(reg.verify("US", 2, hidden_size=2 * HIDDEN, base_fingerprint="sha256:other")) == 2
    _tamper_weights(reg, "US", 2, _flip_last_byte)
    problems = open_client().verify("US", 2)
    assert len(problems) == 1 and "US@2" in problems[0] and "sha256" in problems[0]
    with pytest.raises(AdapterCorrupt, match="US@2"):
        open_client().load("US", 2)
    assert reg.verify("US", 1) == []

    # ---- remove one version: gone whole, and its number is never given out again
    assert [i.ref for i in reg.remove("US", 2)] == ["US@2"]
    assert reg.versions("US") == [1] and reg.resolve("US") == us1
    with pytest.raises(AdapterNotFound):
        reg.load("US", 2)
    with pytest.raises(AdapterNotFound):
        reg.remove("US", 2)
    us3 = _save(reg, "US", 4)
    assert us3.ref == "US@3"

    # ---- a broken newest version does not take its region down: skipped, warned about, the previous one served
    _tamper_weights(reg, "US", 3, lambda data: data[:-8])
    fresh = open_client()
    infos, warnings = fresh.scan()
    assert [i.ref for i in infos] == ["CN@1", "US@1"] and [w.ref for w in warnings] == ["US@3"]
    assert fresh.resolve("US") == fresh.resolve("US", 1) and torch.equal(fresh.load("US").prompt, _prompt(1))
    with pytest.raises(AdapterCorrupt, match="US@3"):
        fresh.load("US", 3)

    # ---- remove a region: every version, unreadable ones too; its numbers stay used
    assert [i.ref for i in reg.remove("US")] == ["US@1", "US@3"]
    assert reg.regions() == ["CN"] and reg.scan()[1] == []
    with pytest.raises(AdapterNotFound):
        reg.remove("US")
    assert _save(reg, "US", 5).ref == "US@4"

    # ---- concurrent publishers, each its own client: distinct numbers, nothing overwritten
    refs, errors = [], []

    def publish(seed: int):
        try:
            refs.append(_save(open_client(), "IN", seed).ref)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(seed,)) for seed in range(10, 15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(refs) == [f"IN@{v}" for v in range(1, 6)]
    check = open_client()
    seeds = {v: check.load("IN", v).provenance["seed"] for v in check.versions("IN")}
    assert sorted(seeds.values()) == list(range(10, 15))
    assert all(torch.equal(check.load("IN", v).prompt, _prompt(seed)) for v, seed in seeds.items())
