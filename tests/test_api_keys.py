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
