"""The reliability suite against a live server: `bentoml serve service:Culign` on 127.0.0.1 over a copy of the
committed registry (reliability/harness.py), attacked, loaded, disconnected from and broken under.

- hostile inputs: the generated corpus (reliability/corpus.py, >= 200 cases) and property-based requests drawn
  by schemathesis from the server's own /docs.json (reliability/fuzz.py); each must be a 4xx with a JSON error
  naming the parameter within 30 s, and the server must answer a normal request right after;
- load: 16 clients for 60 s, mixed regions and the base model, half streaming, max_tokens 8..32;
- client disconnects: 20 streams closed after their first chunk, then a lone request at about solo speed;
- faults: an adapter's weights truncated, its culign.json garbled, its folder removed mid-rescan, a half-written
  version, a new version without restart, a version replaced under the same number.

The default test run takes the quick part (marked reliability_quick: the hostile corpus, the schema fuzzing and
one fault); `make reliability` (or `pytest -m reliability`) runs everything and prints the summary table.
Known serving-engine defects are xfail(strict=False) with the reason, not weakened checks.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("schemathesis")

from culign.registry import Registry  # noqa: E402
from reliability import fuzz, hostile, load  # noqa: E402
from reliability.corpus import build, model_schemas  # noqa: E402
from reliability.harness import REPO, copy_registry, record, serve  # noqa: E402

pytestmark = [pytest.mark.reliability, pytest.mark.server, pytest.mark.real]
quick = pytest.mark.reliability_quick
FULL = os.environ.get("CULIGN_RELIABILITY_FULL") == "1"  # make reliability: also run the cases known to hang

# Serving defects seen on the engine in the working tree (2026-12-01), by case id pattern. Each is reported, and
# xfail(strict=False) so the suite stays a gate for everything else.
KNOWN: dict[str, str] = {}  # none open (plain-text 404/405 and the refused-region 404 were fixed in 90750d7)
HANGS: dict[str, str] = {}  # none open (deeply nested bodies hung on a RecursionError: fixed in 90750d7)

CASES = build(model_schemas())
_OUTCOMES: Counter = Counter()
_KNOWN_BAD: Counter = Counter()  # 5xx / hangs of cases marked as known engine defects
_FAILED: list[str] = []


def _marks(case_id: str):
    for pattern, why in HANGS.items():
        if fnmatch.fnmatch(case_id, pattern):
            return [pytest.mark.xfail(reason=why, strict=False, run=FULL)]
    for pattern, why in KNOWN.items():
        if fnmatch.fnmatch(case_id, pattern):
            return [pytest.mark.xfail(reason=why, strict=False)]
    return []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    # valid bodies that give no max_tokens (schemathesis draws many) generate 8 tokens, not 128: the 30 s limit is
    # about hangs, not about a shared 2-core machine's decoding speed
    with serve(tmp, copy_registry(tmp / "adapters"), CULIGN_DEFAULT_MAX_TOKENS=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client() as c:
        yield c


# ---------------------------------------------------------------------------------------------------- hostile corpus
@quick
@pytest.mark.parametrize("case", [pytest.param(c, id=f"{n:03d}", marks=_marks(c.id)) for n, c in enumerate(CASES)])
def test_hostile_input(server, client, case):
    out = hostile.send(client, server.url, case)
    _OUTCOMES[out.klass] += 1
    if _marks(case.id) and out.klass in ("5xx", "hang", "dropped"):
        _KNOWN_BAD[out.klass] += 1
    found = hostile.problems(case, out)
    # the server must answer a normal request right after: a listing always, a generation every 25 cases
    if not server.alive():
        found.append("the server did not answer GET /v1/models right after")
    elif CASES.index(case) % 25 == 0 and server.normal(client).status_code != 200:
        found.append("the server did not answer a normal chat right after")
    if found:
        _FAILED.append(f"{case.id}: {found[0]}")
    assert not found, f"{case.id} ({case.method} {case.path}): " + "; ".join(found)


@quick
def test_hostile_corpus_summary(server, client):
    """Runs after the cases (file order): >= 200 distinct cases, no 5xx, no hang, a normal request still served."""
    assert len(CASES) >= 200 and len({c.id for c in CASES}) == len(CASES)
    assert server.normal(client).status_code == 200
    record("hostile", cases=len(CASES), sent=sum(_OUTCOMES.values()), **dict(_OUTCOMES),
           failed=len(_FAILED), failures=_FAILED[:40], known_bad=dict(_KNOWN_BAD), rss_mb=server.rss_mb())
    unknown = {k: _OUTCOMES[k] - _KNOWN_BAD[k] for k in ("5xx", "hang")}
    assert unknown == {"5xx": 0, "hang": 0}, (_OUTCOMES, _FAILED[:10])
    if _KNOWN_BAD["5xx"] or _KNOWN_BAD["hang"]:
        pytest.xfail(f"only known engine defects failed the gate: {dict(_KNOWN_BAD)} ({', '.join(HANGS.values())})")


# ---------------------------------------------------------------------------------------------------- schema fuzzing
FUZZ_N = int(os.environ.get("CULIGN_FUZZ_EXAMPLES", "100" if FULL else "30"))


def _oversized(headers: dict[str, str]) -> bytes:
    body = json.dumps({"model": "US", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@quick
@pytest.mark.parametrize("name,headers", [
    ("one value over the value cap", {"User-Agent": "a" * 20_000}),
    ("a 100 KB cookie, over the block cap", {"Cookie": "c=" + "x" * 100_000}),
    ("many headers under the value cap, over the block cap", {f"X-Pad-{i:02d}": "p" * 7000 for i in range(12)}),
    ("a 1 MB header, far past the parser's hard cap", {"X-Huge": "h" * 1_000_000}),
])
def test_oversized_headers_get_one_answer_however_split(server, name, headers):
    """Issue 20: the same oversized header, written in one piece or in 4 KiB / 1 KiB writes, 50 times each, gets
    the same 431 with the same JSON body naming the largest header (h11 used to answer a plain-text 400 when the
    header block arrived in several reads)."""
    request = _oversized(headers)
    want_param = max(headers, key=lambda k: len(k) + len(headers[k])).lower()
    seen: Counter = Counter()
    for _ in range(50):
        for chunk in (None, 4096, 1024):
            status, ctype, body = hostile.send_raw(server.url, request, chunk)
            seen[(status, ctype, body)] += 1
    assert len(seen) == 1, f"{name}: {len(seen)} different answers: " + "; ".join(
        f"{n}x {s} {c} {b[:120]!r}" for (s, c, b), n in seen.items())
    status, ctype, body = next(iter(seen))
    error = json.loads(body)["error"]
    assert (status, ctype, error["param"], error["code"]) == (431, "application/json", want_param, 431)
    assert "hhhh" not in error["message"] and "pppp" not in error["message"]  # names the header, never echoes it
    assert server.normal(timeout=120).status_code == 200  # and the server is fine afterwards


@quick
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzzing(server, client, path, mode):
    openapi = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    drawn = fuzz.draw(openapi, path, mode, FUZZ_N, seed=zlib.crc32(f"{path} {mode}".encode()) % 1000)
    assert len(drawn) >= FUZZ_N // 2
    records = fuzz.send(drawn, server.url)
    counts = Counter("hang" if r["status"] is None else f"{r['status'] // 100}xx" for r in records)
    unnamed = [r for r in records if r["status"] and 400 <= r["status"] < 500 and not r.get("param")]
    bad = [r for r in records if r["status"] is None or r["status"] >= 500 or r["seconds"] > 30]
    assert server.alive() and server.normal(client).status_code == 200
    record("fuzz", path=path, mode=mode, cases=len(records), **dict(counts), unnamed_4xx=len(unnamed),
           failures=[f"{r.get('status')}: {r['key'][:120]}" for r in bad + unnamed][:20])
    assert not bad, bad[:5]
    assert not unnamed, f"4xx without error.param: {unnamed[:5]}"


# ---------------------------------------------------------------------------------------------------- load
LOAD_SECONDS = float(os.environ.get("CULIGN_LOAD_SECONDS", "60"))
RSS_GROWTH_MB = 300.0  # the stated bound on worker RSS growth over the load run (the model alone is ~0.8 GB)


def test_load_16_clients(server):
    load.solo(server.url, 8, 1)  # warm: every code path compiled and allocated once before measuring
    before = server.rss_mb()
    result = load.run_load(server.url, clients=16, seconds=LOAD_SECONDS)
    after = server.rss_mb()
    growth = after["worker"] - before["worker"]
    record("load", **result, rss_before_mb=round(before["worker"]), rss_after_mb=round(after["worker"]),
           rss_growth_mb=round(growth), rss_bound_mb=RSS_GROWTH_MB)
    assert result["requests"] > 0 and result["errors"] == 0, result
    assert growth < RSS_GROWTH_MB, (before, after)


def test_client_disconnects_free_their_rows(server):
    base = load.solo(server.url, 32, 3)
    before, cancelled_before = server.rss_mb(), load.gauges(server.url)["culign_cancelled_rows_total"]
    result = load.disconnect_streams(server.url, 20, 32)
    drain = load.drain_seconds(server.url)  # rows decoded to the end would take about a whole solo answer
    t0 = time.monotonic()
    after_s = load.solo(server.url, 32, 1)
    waited = time.monotonic() - t0
    again = load.solo(server.url, 32, 1)  # the machine's speed now (a shared 2-core box drifts)
    after = server.rss_mb()
    cancelled = load.gauges(server.url)["culign_cancelled_rows_total"] - cancelled_before
    record("disconnect", **result, solo_s=round(base, 2), drain_s=round(drain, 2), after_s=round(after_s, 2),
           solo_again_s=round(again, 2), cancelled_rows=cancelled, rss_before_mb=round(before["worker"]),
           rss_after_mb=round(after["worker"]))
    assert result["first_chunks"] == 20, result
    # the 20 dropped rows leave within a few decode steps, not after their 32 tokens
    assert drain < max(3.0, 0.25 * base), f"rows still in flight {drain:.1f} s after the disconnects (solo {base:.1f} s)"
    assert cancelled >= 19, f"only {cancelled} of the 20 dropped rows were cancelled"
    # Once the gauges say no row is in flight and none waits, the next request is decoded alone: its time is
    # recorded against solo runs before and after. It is not asserted: on a shared 2-core machine another torch
    # process makes one decode step 1x-6x slower from one second to the next (measured while writing this).
    if waited > 2 * max(base, again) + 1.0:
        warnings.warn(f"a lone request took {waited:.1f} s after the disconnects (solo {base:.1f} s before, "
                      f"{again:.1f} s after); rows in flight were 0 already")
    assert after["worker"] - before["worker"] < 100, (before, after)


# ---------------------------------------------------------------------------------------------------- faults
FAULT = "IN"  # the region the faults hit; the others must keep serving


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """Its own server: version 1 of every region, float32 (greedy outputs comparable between requests)."""
    tmp = tmp_path_factory.mktemp("faults")
    root = copy_registry(tmp / "adapters", versions=(1,))
    with serve(tmp, root, CULIGN_DTYPE="float32", CULIGN_RESCAN_SECONDS="0.5") as s:
        yield s


def _ask(server, region: str, question: str = "Say hello.", tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", json={"messages": [{"role": "user", "content": question}],
                                                  "max_tokens": tokens},
                      headers={"X-Culign-Region": region}, timeout=60)


def _verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "culign.cli", "adapters", "verify", "--adapters-dir", str(root)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _others_serve(server) -> None:
    for region in ("US", "CN", "SA"):
        r = _ask(server, region, tokens=2)
        assert r.status_code == 200, (region, r.text)


def _wait_rescan(server) -> None:
    time.sleep(1.2)  # CULIGN_RESCAN_SECONDS=0.5, twice over


def _refusal(server, region: str, why_words: tuple[str, ...]) -> tuple[httpx.Response, list[str]]:
    r = _ask(server, region)
    problems = []
    if not (400 <= r.status_code < 500 or r.status_code == 503):
        problems.append(f"status {r.status_code}")
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return r, problems + [f"not a JSON error: {r.text[:200]}"]
    message = err.get("message", "")
    if FAULT not in message:
        problems.append(f"the message does not name {FAULT}: {message!r}")
    if not any(w in message.lower() for w in why_words):
        problems.append(f"the message does not say why ({'/'.join(why_words)}): {message!r}")
    return r, problems


class _Fault:
    """Damage FAULT@1 in the server's registry, and put it back afterwards."""

    def __init__(self, server):
        self.path = server.registry / FAULT / "1"
        self.saved = Path(str(self.path) + ".orig")

    def __enter__(self):
        shutil.copytree(self.path, self.saved)
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        os.rename(self.saved, self.path)


REFUSED_REASON = ("a region whose only version the registry scan refused must be answered naming the adapter and "
                  "the reason (the scan's ScanWarning), not as an unknown region")


@quick
def test_fault_truncated_weights(fault_server):
    s = fault_server
    assert _ask(s, FAULT).status_code == 200
    with _Fault(s) as f:
        weights = f.path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        _wait_rescan(s)
        r, problems = _refusal(s, FAULT, ("truncated", "corrupt", "refused"))
        for _ in range(5):
            _ask(s, FAULT)
        _others_serve(s)
        v = _verify(s.registry)
        assert v.returncode == 1 and f"{FAULT}@1: FAILED" in v.stdout and "truncated" in v.stdout, v.stdout
        log_lines = [ln for ln in s.log().splitlines() if f"{FAULT}@1" in ln and "truncated" in ln]
        record("fault", fault="truncated weights", status=r.status_code, body=r.text[:200], problems=problems,
               verify="FAILED (named)", log_lines=len(log_lines))
        assert 1 <= len(log_lines) <= 2, f"the log should say why once, not per request: {log_lines}"
    _wait_rescan(s)
    assert _ask(s, FAULT).status_code == 200  # repaired: served again without a restart
    assert not problems, f"{REFUSED_REASON}; got {r.status_code} {r.text[:200]}"


def test_fault_garbled_provenance(fault_server):
    s = fault_server
    with _Fault(s) as f:
        (f.path / "culign.json").write_text('{"region": "IN", "version": 1, "weights_sha')
        _wait_rescan(s)
        r, problems = _refusal(s, FAULT, ("culign.json", "corrupt", "refused", "unreadable"))
        _others_serve(s)
        v = _verify(s.registry)
        assert v.returncode == 1 and f"{FAULT}@1: FAILED" in v.stdout and "culign.json" in v.stdout, v.stdout
        record("fault", fault="garbled culign.json", status=r.status_code, body=r.text[:200], problems=problems,
               verify="FAILED (named)")
    _wait_rescan(s)
    assert _ask(s, FAULT).status_code == 200
    assert not problems, f"{REFUSED_REASON}; got {r.status_code} {r.text[:200]}"


def test_fault_folder_removed_mid_rescan(fault_server):
    s = fault_server
    statuses: Counter = Counter()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                statuses[_ask(s, FAULT, tokens=2).status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1

    with _Fault(s) as f:
        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        time.sleep(0.5)
        shutil.rmtree(f.path)  # removed file by file while rescans and requests run
        time.sleep(2.0)
        stop.set()
        t.join(60)
        r = _ask(s, FAULT)
        _others_serve(s)
        v = _verify(s.registry)
        record("fault", fault="folder removed mid-rescan", status=r.status_code, body=r.text[:200],
               during=dict(statuses))
        assert r.status_code == 404 and FAULT in r.json()["error"]["message"], r.text
        assert all(isinstance(k, int) and (k == 200 or 400 <= k < 500 or k == 503) for k in statuses), statuses
        assert v.returncode == 0 and FAULT not in v.stdout  # gone is not broken: nothing left to verify
    _wait_rescan(s)
    assert _ask(s, FAULT).status_code == 200


def _new_version_folder(server, tmp: Path, version: int, like: str) -> Path:
    """A complete version folder for FAULT@version holding region ``like``'s prompt (so its outputs are known),
    stamped as FAULT@version: what an operator copies in from another machine's registry."""
    src = Registry(server.registry).resolve(like).path
    out = tmp / f"{FAULT}-{version}"
    shutil.copytree(src, out)
    prov = json.loads((out / "culign.json").read_text())
    prov.update(region=FAULT, version=version, created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    (out / "culign.json").write_text(json.dumps(prov))
    return out


def _models(server) -> dict:
    data = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    return {m["id"]: m for m in data}


def test_half_written_then_complete_new_version_without_restart(fault_server, tmp_path):
    s = fault_server
    region_dir = s.registry / FAULT
    full = _new_version_folder(s, tmp_path, 7, like="CN")
    half = region_dir / "7"
    half.mkdir()
    try:
        shutil.copy(full / "adapter_model.safetensors", half)  # copied in file by file: weights first
        _wait_rescan(s)
        served = _ask(s, FAULT)
        as7 = _ask(s, f"{FAULT}@7")
        assert served.status_code == 200 and served.headers.get("x-culign-adapter") == f"{FAULT}@1", served.headers
        assert 400 <= as7.status_code < 500 or as7.status_code == 503, as7.text
        assert f"{FAULT}@7" not in json.dumps(_models(s))
        for name in ("adapter_config.json", "culign.json"):
            shutil.copy(full / name, half)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 7 not in (_models(s).get(FAULT, {}).get("versions") or []):
            time.sleep(0.2)
        listed = _models(s).get(FAULT, {})
        r = _ask(s, FAULT)
        cn = _ask(s, "CN")
        record("fault", fault="half-written, then completed version", half_status=as7.status_code,
               listed=listed.get("versions"), served=r.headers.get("x-culign-adapter"))
        assert r.status_code == 200 and r.headers.get("x-culign-adapter") == f"{FAULT}@7", (r.headers, listed)
        assert r.json()["message"]["content"] == cn.json()["message"]["content"]  # CN's prompt, so CN's answer
    finally:
        shutil.rmtree(half, ignore_errors=True)
    _wait_rescan(s)


def test_a_version_replaced_under_the_same_number_is_never_served_stale(fault_server, tmp_path):
    s = fault_server
    region_dir = s.registry / FAULT
    first = _new_version_folder(s, tmp_path / "a", 8, like="US")
    second = _new_version_folder(s, tmp_path / "b", 8, like="SA")
    try:
        shutil.copytree(first, region_dir / "8")
        _wait_rescan(s)
        a = _ask(s, f"{FAULT}@8")
        assert a.status_code == 200 and a.json()["message"]["content"] == _ask(s, "US").json()["message"]["content"]
        time.sleep(1.1)  # a new 'created' second, as a real re-publish would have
        second_prov = json.loads((second / "culign.json").read_text())
        second_prov["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        (second / "culign.json").write_text(json.dumps(second_prov))
        os.rename(region_dir / "8", tmp_path / "old-8")
        shutil.copytree(second, region_dir / "8")
        stale = 0
        sa = _ask(s, "SA").json()["message"]["content"]
        deadline = time.monotonic() + 3
        answers = []
        while time.monotonic() < deadline:
            r = _ask(s, f"{FAULT}@8")
            answers.append(r.status_code)
            if r.status_code == 200 and r.json()["message"]["content"] != sa:
                stale += 1
        final = _ask(s, f"{FAULT}@8")
        record("fault", fault="version replaced under the same number", stale_answers_in_first_3s=stale,
               requests=len(answers))
        assert final.status_code == 200 and final.json()["message"]["content"] == sa
        # within a rescan period the old prompt may still answer; after that, never
        late = [_ask(s, f"{FAULT}@8").json()["message"]["content"] for _ in range(3)]
        assert all(x == sa for x in late)
    finally:
        shutil.rmtree(region_dir / "8", ignore_errors=True)
    _wait_rescan(s)
