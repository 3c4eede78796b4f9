"""API keys (CULIGN_API_KEYS): the keys file and the check in-process, then a real server per engine (culign, vLLM)
with keys, driven by the official openai client's ``api_key`` and by the hostile corpus's auth cases."""
from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter

import pytest

from culign.serving.auth import ApiKeyFileError, ApiKeys, AuthError
from culign.serving.settings import ServiceSettings

KEY_ALL, KEY_US, KEY_BASE_CN = "sk-culign-all-0123456789", "sk-culign-us-abcdef", "sk-culign-base-cn-xyz"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# culign API keys\n{sha(KEY_ALL)}   # every region\n{sha(KEY_US)} US\n\n"
                    f"{sha(KEY_BASE_CN).upper()} base, cn  # upper-case hex is fine\n")
    return path


# ---------------------------------------------------------------------------------------------------- in-process
def test_keys_file_and_grants(tmp_path):
    keys = ApiKeys.load(keys_file(tmp_path))
    assert len(keys) == 3
    everything = keys.check(f"Bearer {KEY_ALL}")
    assert everything.regions is None and everything.allows("CN") and everything.allows(None)
    us = keys.check(f"bearer  {KEY_US} ")
    assert us.allows("US") and us.allows("us") and not us.allows("CN") and not us.allows(None)
    base_cn = keys.check(f"Bearer {KEY_BASE_CN}")
    assert base_cn.allows(None) and base_cn.allows("CN") and not base_cn.allows("US")
    assert KEY_US not in repr(us) and sha(KEY_US) not in repr(us)  # a grant names its line, never the key


@pytest.mark.parametrize("value", [None, "", "Bearer", "Bearer ", "Basic abc", KEY_ALL, f"Token {KEY_ALL}",
                                   "Bearer wrong", f"Bearer {KEY_ALL[:-1]}", "Bearer " + "k" * 100_000])
def test_bad_authorization_values_are_refused(tmp_path, value):
    with pytest.raises(AuthError):
        ApiKeys.load(keys_file(tmp_path)).check(value)


def test_every_stored_hash_is_compared_in_constant_time(tmp_path, monkeypatch):
    keys = ApiKeys.load(keys_file(tmp_path))
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    keys.check(f"Bearer {KEY_ALL}")  # the first entry matches: all three are still compared
    assert len(calls) == 3


@pytest.mark.parametrize("content,why", [("", "holds no key"), ("sk-plaintext-key\n", "64 hex"),
                                         (f"{sha('a')[:-2]}\n", "64 hex"), (f"{sha('a')} U/S\n", "region name")])
def test_bad_keys_files_name_the_line(tmp_path, content, why):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ApiKeyFileError, match=why):
        ApiKeys.load(path)
    with pytest.raises(ApiKeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing")


def test_settings_read_the_variable(tmp_path):
    assert ServiceSettings.from_env({}, default_adapters=tmp_path).api_keys is None
    assert ServiceSettings.from_env({"CULIGN_API_KEYS": str(tmp_path / "k")}, default_adapters=tmp_path).api_keys \
        == tmp_path / "k"


# ---------------------------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module", params=["culign", "vllm"])
def keyed(request, tmp_path_factory):
    pytest.importorskip("bentoml")
    if request.param == "vllm":
        from conftest import need_vllm
        need_vllm()
    from reliability.harness import copy_registry, serve

    tmp = tmp_path_factory.mktemp(f"keyed-{request.param}")
    with serve(tmp, copy_registry(tmp / "adapters", versions=(1,)), CULIGN_API_KEYS=str(keys_file(tmp)),
               CULIGN_DTYPE="float32", CULIGN_ENGINE=request.param) as srv:
        srv.engine = request.param  # for the records
        yield srv


def client(server, key):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.server
@pytest.mark.real
def test_openai_client_with_keys(keyed):
    import openai

    hi = [{"role": "user", "content": "Say hello."}]
    reply = client(keyed, KEY_ALL).chat.completions.create(model="CN", messages=hi, max_tokens=2)
    assert reply.model == "CN@1"
    us = client(keyed, KEY_US)
    assert us.chat.completions.create(model="US", messages=hi, max_tokens=2).model == "US@1"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        us.chat.completions.create(model="CN", messages=hi, max_tokens=2)
    assert denied.value.status_code == 403 and denied.value.body["param"] == "model"
    with pytest.raises(openai.PermissionDeniedError):  # by the header too
        us.chat.completions.create(model="SmolLM2-135M-Instruct", messages=hi, max_tokens=2,
                                   extra_headers={"X-Culign-Region": "china"})
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(keyed, "sk-wrong").chat.completions.create(model="US", messages=hi, max_tokens=2)
    assert wrong.value.status_code == 401 and wrong.value.body["param"] == "Authorization"
    assert wrong.value.body["code"] == "invalid_api_key"  # OpenAI's own code for it
    # /v1/models: only what the key may use
    assert {m.id for m in us.models.list()} == {"US"}
    assert {m.region for m in client(keyed, KEY_BASE_CN).models.list()} == {None, "CN"}
    assert {"US", "CN", "IN", "SA"} <= {m.id for m in client(keyed, KEY_ALL).models.list()}
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "sk-wrong").models.list()


@pytest.mark.server
@pytest.mark.real
def test_probes_and_metrics_need_no_key_and_keys_are_never_logged(keyed):
    import httpx

    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(keyed.url + path, timeout=30).status_code == 200, path
    docs = httpx.get(keyed.url + "/docs.json", timeout=30)
    assert docs.status_code == 401 and docs.headers["www-authenticate"] == "Bearer"
    log = keyed.log()
    assert re.search(r"API keys: on, 3 keys", log)
    for key in (KEY_ALL, KEY_US, KEY_BASE_CN):
        assert key not in log and sha(key) not in log


@pytest.mark.server
@pytest.mark.real
@pytest.mark.reliability
@pytest.mark.reliability_quick
def test_hostile_auth_cases(keyed):
    """The hostile corpus's auth cases (reliability/corpus.auth_cases); part of make reliability too."""
    import httpx

    from reliability.corpus import auth_cases
    from reliability.harness import record
    from reliability.hostile import problems, send

    cases = auth_cases(KEY_US)
    assert len(cases) >= 40
    outcomes = Counter()
    with httpx.Client() as c:
        found = {}
        for case in cases:
            out = send(c, keyed.url, case)
            outcomes[out.klass] += 1
            if p := problems(case, out):
                found[case.id] = p
    record("auth", engine=keyed.engine, cases=len(cases), **dict(outcomes), failed=len(found),
           failures=[f"{k}: {v[0]}" for k, v in found.items()][:20])
    assert not found, found
    assert not re.search(r"status=5\d\d", keyed.log()), "a request got a 5xx"


# ---------------------------------------------------------------------------------------------------- rotation
def test_keyring_keeps_the_last_good_keys_and_reloads_a_fixed_file(tmp_path, caplog):
    from culign.serving.auth import KeyRing

    path = keys_file(tmp_path)
    ring = KeyRing(path)
    assert ring.check(f"Bearer {KEY_US}").regions == frozenset({"US"})
    path.write_text(f"{sha(KEY_US)} US\nzz-not-hex\n")
    assert not ring.reload() and ring.reload() is False  # refused twice, logged once
    assert ring.file_refused and "line 2" in ring.last_error
    assert sum("refused, keeping the 3 keys" in r.getMessage() for r in caplog.records) == 1
    assert ring.check(f"Bearer {KEY_ALL}").regions is None  # the last good keys are still in force
    path.unlink()
    assert not ring.reload() and ring.check(f"Bearer {KEY_ALL}")  # a vanished file changes nothing either
    path.write_text(f"{sha(KEY_US)} US\n")
    assert ring.reload() and not ring.file_refused and ring.reloads == 1
    with pytest.raises(AuthError):
        ring.check(f"Bearer {KEY_ALL}")
    us = ring.check(f"Bearer {KEY_US}")
    assert us.key_id == ApiKeys.load(path).check(f"Bearer {KEY_US}").key_id and len(us.key_id) == 16
    assert us.key_id not in (KEY_US, sha(KEY_US))  # an id that names the key without revealing it


def test_key_shares_bound_each_key_and_give_places_back():
    from culign.serving.admission import KeyShareExceeded, KeyShares
    from culign.serving.engines import Stats

    shares = KeyShares(capacity=6, share=0.5)
    for _ in range(3):
        shares.take("a")
    stats = Stats()
    stats.record_step(1, 16)  # two steps: a rate to estimate from
    stats.record_step(1, 16)
    with pytest.raises(KeyShareExceeded) as e:
        shares.take("a", stats)
    assert e.value.retry_after >= 1 and "share" in str(e.value)
    shares.take("b")  # another key is still admitted
    shares.give_back("a")
    shares.take("a")
    assert shares.held("a") == 3 and shares.held("b") == 1 and shares.refused == 1
    assert KeyShares(capacity=1, share=0.5).limit == 1  # never below one place
    with pytest.raises(ValueError):
        KeyShares(capacity=4, share=0.0)


def _write_atomically(path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)  # as an operator's deploy tool would: readers see the old file or the new one


def _status(url: str, key: str, path: str = "/v1/models") -> int:
    import httpx

    return httpx.get(url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def _until(predicate, seconds: float, what: str) -> float:
    import time

    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < seconds, f"{what} not within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):  # {pid="..."} under bentoml serve
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _worker(server):
    """The BentoML worker process (the one that loaded the model and holds the keys), not the arbiter."""
    import psutil

    return max(psutil.Process(server.proc.pid).children(recursive=True), key=lambda p: p.memory_info().rss)


KEY_A, KEY_B, KEY_C, KEY_D = (f"sk-culign-rotate-{c}-0123456789" for c in "abcd")


@pytest.mark.server
@pytest.mark.real
def test_keys_rotate_without_a_restart(tmp_path):
    """A removed key gets 401 within seconds, a new one works, a malformed file keeps the last good keys (said once
    in the log and on /metrics); the server never restarts (same worker throughout)."""
    from reliability.harness import copy_registry, serve

    keys = tmp_path / "keys"
    keys.write_text(f"{sha(KEY_A)}\n{sha(KEY_B)}\n")
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_API_KEYS=str(keys),
               CULIGN_DTYPE="float32") as srv:
        worker = _worker(srv)
        assert _status(srv.url, KEY_A) == 200 and _status(srv.url, KEY_C) == 401
        _write_atomically(keys, f"{sha(KEY_B)}\n{sha(KEY_C)} US\n")  # A revoked, C added
        revoked_s = _until(lambda: _status(srv.url, KEY_A) == 401, 5, "the revoked key refused")
        assert _status(srv.url, KEY_C) == 200 and _status(srv.url, KEY_B) == 200
        assert _metric(srv.url, "culign_api_keys_reloads_total") == 1

        _write_atomically(keys, f"{sha(KEY_B)}\nnot-a-hash US\n")  # a typo: refused, the last good keys stay
        _until(lambda: _metric(srv.url, "culign_api_keys_file_refused") == 1, 5, "the bad file reported")
        import time
        time.sleep(2.5)  # several more polls of the same bad file
        assert _status(srv.url, KEY_C) == 200 and _status(srv.url, KEY_B) == 200 and _status(srv.url, KEY_D) == 401
        assert srv.log().count("refused, keeping the 2 keys in force") == 1  # said once, not at every poll
        assert "line 2" in srv.log()

        _write_atomically(keys, f"{sha(KEY_D)}\n")
        _until(lambda: _status(srv.url, KEY_D) == 200, 5, "the fixed file loaded")
        assert _status(srv.url, KEY_B) == 401 and _metric(srv.url, "culign_api_keys_file_refused") == 0
        assert _worker(srv).pid == worker.pid and srv.proc.poll() is None  # no restart
        for key in (KEY_A, KEY_B, KEY_C, KEY_D):
            assert key not in srv.log() and sha(key) not in srv.log()
    print(f"revoked key refused {revoked_s:.1f} s after the file changed")


@pytest.mark.server
@pytest.mark.real
def test_sighup_reloads_the_keys_file(tmp_path):
    import signal

    from reliability.harness import copy_registry, serve

    keys = tmp_path / "keys"
    keys.write_text(f"{sha(KEY_A)}\n")
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_API_KEYS=str(keys),
               CULIGN_API_KEYS_POLL_S="3600", CULIGN_DTYPE="float32") as srv:  # no polling: only SIGHUP reloads
        _write_atomically(keys, f"{sha(KEY_B)}\n")
        import time
        time.sleep(1.5)
        assert _status(srv.url, KEY_A) == 200  # not polled
        _worker(srv).send_signal(signal.SIGHUP)
        _until(lambda: _status(srv.url, KEY_B) == 200 and _status(srv.url, KEY_A) == 401, 5, "SIGHUP's reload")
        assert "(SIGHUP)" in srv.log() and srv.proc.poll() is None


# ---------------------------------------------------------------------------------------------------- fairness
def _flood_and_ask(srv) -> tuple[Counter, list[int], list[str]]:
    """8 long requests at once under the flooding key, then 3 short ones, one after another, under the polite
    key while the flood is still running: (the flood's statuses, the polite statuses, Retry-After values)."""
    import threading
    import time

    import httpx

    flood: Counter = Counter()
    retry_after: list[str] = []
    long = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 120}

    def flooder():
        r = httpx.post(srv.url + "/v1/chat/completions", json=long, timeout=300,
                       headers={"Authorization": f"Bearer {KEY_A}"})
        flood[r.status_code] += 1
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after", ""))

    threads = [threading.Thread(target=flooder) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood has taken what it can
    polite = []
    for _ in range(3):
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=300, headers={"Authorization": f"Bearer {KEY_B}"},
                       json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4})
        polite.append(r.status_code)
    for t in threads:
        t.join(300)
    return flood, polite, retry_after


@pytest.mark.server
@pytest.mark.real
@pytest.mark.parametrize("share", ["0.5", "1"])
def test_a_flooding_key_cannot_starve_a_polite_one(tmp_path, share):
    """1 row + 3 waiting = 4 places. With the default share (one half) the flooding key holds at most 2: the rest of
    its burst gets 429 with Retry-After and every polite request is served. With a share of 1 (the old global bound
    alone) the same flood fills every place and the polite key is refused: the share is what protects it."""
    from reliability.harness import copy_registry, serve

    keys = tmp_path / "keys"
    keys.write_text(f"{sha(KEY_A)}\n{sha(KEY_B)}\n")
    with serve(tmp_path, copy_registry(tmp_path / "adapters", versions=(1,)), CULIGN_API_KEYS=str(keys),
               CULIGN_DTYPE="float32", CULIGN_MAX_ROWS="1", CULIGN_MAX_QUEUE="3", CULIGN_MAX_TOKENS="300",
               CULIGN_KEY_SHARE=share) as srv:
        flood, polite, retry_after = _flood_and_ask(srv)
        refused_for_share = _metric(srv.url, "culign_key_share_rejected_total")
    if share == "0.5":
        assert flood[200] == 2 and flood[429] == 6, flood
        assert polite == [200, 200, 200], polite
        assert refused_for_share == 6 and all(v.isdigit() and int(v) >= 1 for v in retry_after), retry_after
    else:
        assert flood[200] == 4 and flood[429] == 4, flood
        assert polite[0] == 429, polite  # starved: what the default share prevents
