"""The hostile corpus: bad requests generated from a few rules and the service's own OpenAPI schema, not listed one
by one. Every case says what a correct server answers: a 4xx status (or a set of them) with a JSON error body
``{"error": {"message", "type", "param", "code"}}`` whose ``param`` names the culprit.

    from reliability.corpus import build, model_schemas
    cases = build(model_schemas())  # >= 200 distinct cases, from the request models' own JSON schema

(The property-based half of the suite, reliability/fuzz.py, draws from the live server's OpenAPI document.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

HEADER = "X-Culign-Region"
CAP = 32  # the server under test's CULIGN_MAX_TOKENS (reliability.harness.CAP)

# Region strings that must never name an adapter (and never a path): the same list the in-process tests use.
HOSTILE_REGIONS = ["..", "../US", "US/..", "US/1", "/etc", "/tmp/out/OUT", "%2e%2e", "%2e%2e%2fUS", "..%2fUS",
                   "US@-1", "US@1.0", "US@0", "US@01", "US@+1", "US@1@2", "US@", "@1", "US@99999999999", "US\n",
                   " US", "U S", "\u0555S", "\uff35\uff33", "U\u0405", "\u212aR", "US\u200b", "~", ".", "x" * 65,
                   "US@1e0", "US@0x1", "US@\u0661", "US;rm -rf", "US\\..\\CN", "US%00"]
NOT_FOUND_REGIONS = ["US@999", "ATLANTIS", "ZZ@1"]  # well-formed, but no such adapter: 404 naming the parameter

WRONG = {"integer": 7, "number": 1.5, "string": "x", "boolean": True, "array": [1], "object": {"a": 1}}


@dataclass
class Case:
    id: str
    method: str = "POST"
    path: str = "/chat"
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    status: tuple[int, ...] = (400,)  # acceptable statuses
    param: str | tuple[str, ...] | None = None  # what error.param must name (prefix, any case); None: not empty
    chunked: bool = False  # send the body in chunks without a Content-Length
    stream: bool = False  # the body asks for a stream: the refusal must come before any event

    @property
    def kind(self) -> str:
        return self.id.split(":", 1)[0]


def _msgs(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def base(path: str) -> tuple[dict, dict]:
    """A valid body and headers for an endpoint: the starting point every case breaks one thing of."""
    if path == "/chat":
        return {"messages": _msgs(), "max_tokens": 2}, {HEADER: "US"}
    return {"model": "US", "messages": _msgs(), "max_tokens": 2}, {}


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _types(prop: dict, components: dict) -> set[str]:
    """The JSON types a schema property allows ({} for an untyped one: culign refuses those fields by name)."""
    if "$ref" in prop:
        return {"object"}
    if "type" in prop:
        t = prop["type"]
        out = set(t) if isinstance(t, list) else {t}
        return out | ({"integer"} if "number" in out else set())
    out: set[str] = set()
    for sub in prop.get("anyOf", []) + prop.get("oneOf", []):
        out |= _types(sub, components)
    return out


def model_schemas() -> dict[str, dict]:
    """The JSON schema of each endpoint's request model (what BentoML's OpenAPI document is made from)."""
    from culign.serving import ChatCompletionRequest, ChatRequest

    return {"/chat": ChatRequest.model_json_schema(),
            "/v1/chat/completions": ChatCompletionRequest.model_json_schema()}


def openapi_schemas(openapi: dict) -> dict[str, dict]:
    """The same from a live /docs.json."""
    return {p: openapi["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for p in ("/chat", "/v1/chat/completions")}


def build(schemas: dict[str, dict]) -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    components: dict = {}
    endpoints = ["/chat", "/v1/chat/completions"]

    for path in endpoints:
        ok, hdr = base(path)
        short = "chat" if path == "/chat" else "completions"
        text = json.dumps(ok)
        # -- malformed and truncated JSON
        for cut in sorted({1, 2, 5, 10, len(text) // 3, len(text) // 2, len(text) - 2, len(text) - 1}):
            add(Case(f"truncated:{short}:{cut}", path=path, body=text[:cut].encode(), headers=hdr, param="body"))
        for n, junk in enumerate([b"{", b"}", b"{]", b"{'messages': []}", b'{"messages": [}', b'{"messages": [],}',
                                  b"{messages: []}", b'{"messages": NaN}', b"/* c */ {}", b"\xef\xbb\xbf{}",
                                  b'{"a":' * 2000, b"[" * 5000, b"nul", b"tru", b"\x00\x00\x00\x00"]):
            add(Case(f"malformed:{short}:{n}", path=path, body=junk, headers=hdr))  # "body", or what parsed
        for n, top in enumerate([[], [ok], None, "text", 5, True]):
            add(Case(f"not-an-object:{short}:{n}", path=path, body=_j(top), headers=hdr, param="body"))
        add(Case(f"empty-body:{short}", path=path, body=b"", headers=hdr, param="body"))
        add(Case(f"whitespace-body:{short}", path=path, body=b" \n\t " * 10, headers=hdr, param="body"))
        # -- invalid UTF-8 and NUL bytes
        for n, raw in enumerate([b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                                 b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
                                 b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                                 b'{"messages": [{"role": "user", "content": "a\x00b"}]}',
                                 b'{"messages": [{"role": "us\x00er", "content": "hi"}]}',
                                 b'\x00{"messages": []}']):
            add(Case(f"bad-bytes:{short}:{n}", path=path, body=raw, headers=hdr, param="body"))
        add(Case(f"lone-surrogate:{short}", path=path, headers=hdr, param=("messages", "body"),
                 body=b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'))
        # -- every field with the wrong type, from the schema
        schema = schemas[path]
        for name, prop in schema.get("properties", {}).items():
            allowed = _types(prop, components)
            for tname, value in WRONG.items():
                if tname in allowed or (not allowed and tname in ("boolean",)):
                    continue
                if name == "messages" and tname == "array":
                    continue
                add(Case(f"wrong-type:{short}:{name}={tname}", path=path, body=_j({**ok, name: value}), headers=hdr,
                         param=name, stream=name == "stream"))
        add(Case(f"unknown-field:{short}", path=path, body=_j({**ok, "bogus_field": 1}), headers=hdr, param="bogus"))
        add(Case(f"missing-messages:{short}", path=path, body=_j({k: v for k, v in ok.items() if k != "messages"}),
                 headers=hdr, param="messages"))
        # -- conversations: empty, huge, malformed messages
        for n, msgs in enumerate([[], [{}], [{"role": "user"}], [{"content": "hi"}], [{"role": "hacker", "content": "x"}],
                                  [{"role": "user", "content": None}], [{"role": "user", "content": 5}],
                                  [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                                  [{"role": "user", "content": "hi", "extra": 1}], ["hi"], [None], [[1]],
                                  [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                  [{"role": "user", "content": "hi", "name": 5}]]):
            add(Case(f"messages:{short}:{n}", path=path, body=_j({**ok, "messages": msgs}), headers=hdr,
                     param="messages"))
        for n, msgs in enumerate([[{"role": "system", "content": "only a system message"}],
                                  [{"role": "assistant", "content": "only an answer"}],
                                  [{"role": "user", "content": "a\u0000b"}], [{"role": "user", "content": ""}]]):
            # odd but well-formed: served or refused, never a 5xx
            add(Case(f"odd-messages:{short}:{n}", path=path, body=_j({**ok, "messages": msgs}), headers=hdr,
                     status=(200, 400), param="messages"))
        add(Case(f"5000-messages:{short}", path=path, headers=hdr, param="messages", status=(400, 413),
                 body=_j({**ok, "messages": [{"role": "user", "content": f"message {i}"} for i in range(5000)]})))
        add(Case(f"long-context:{short}", path=path, headers=hdr, param="messages", status=(400, 413),
                 body=_j({**ok, "messages": _msgs("word " * 150_000)})))
        # -- 5 MB bodies, with and without a Content-Length
        big = _j({**ok, "messages": _msgs("x" * 5_000_000)})
        add(Case(f"5mb:{short}", path=path, body=big, headers=hdr, status=(413,), param="body"))
        add(Case(f"5mb-chunked:{short}", path=path, body=big, headers=hdr, status=(413,), param="body", chunked=True))
        add(Case(f"5mb-whitespace:{short}", path=path, body=b" " * 5_000_000 + _j(ok), headers=hdr, status=(413,),
                 param="body"))
        # -- out-of-range numbers
        ranges = {"max_tokens": [0, -1, CAP + 1, 10**20, 1e308, 2.5], "temperature": [-1, 1e40, -1e-9, 1e308],
                  "top_p": [-0.5, 1.5, 1e9], "seed": [-2**63 - 1, 2**64, 10**40, 1.5]}
        if path != "/chat":
            ranges.update({"n": [0, 2, -1], "max_completion_tokens": [0, -5, 10**9], "top_logprobs": [-1, 99],
                           "frequency_penalty": [-3, 3, 1e9], "presence_penalty": [-3, 3, 1e9]})
        for name, values in ranges.items():
            for v in values:
                body = {**ok, name: v}
                if name == "max_completion_tokens":
                    body.pop("max_tokens")  # one of the two, or the answer is "they disagree"
                add(Case(f"range:{short}:{name}={v!r}", path=path, body=_j(body), headers=hdr, param=name))
        for v in (-2**63 - 1, 2**64):  # [-2^63, 2^64 - 1] is valid (docs/deploy.md); it matters when sampling: the case that once failed a whole batch
            add(Case(f"range:{short}:seed={v!r}+temperature", path=path, body=_j({**ok, "seed": v, "temperature": 1}),
                     headers=hdr, param="seed"))
        for name in ("temperature", "top_p", "max_tokens"):
            for lit in ("NaN", "Infinity", "-Infinity", "1e999"):
                body = text[:-1] + f', "{name}": {lit}}}'
                add(Case(f"non-finite:{short}:{name}={lit}", path=path, body=body.encode(), headers=hdr,
                         param=(name, "body")))
        # -- stream: true with bad input: refused before the stream starts
        if path != "/chat":
            for n, change in enumerate([{"model": "../US"}, {"model": "US@999"}, {"messages": []},
                                        {"max_tokens": -1}, {"temperature": -1}, {"seed": 2**64},
                                        {"stream_options": 5}, {"n": 3}, {"bogus": 1}]):
                bad = {**ok, "stream": True, **change}
                add(Case(f"stream-bad:{short}:{n}", path=path, body=_j(bad), headers=hdr, stream=True,
                         status=(400, 404), param=next(iter(change))))
        # -- content types
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/xml", "application/json-patch+json"):
            add(Case(f"content-type:{short}:{ctype.split(';')[0]}", path=path, body=_j(ok),
                     headers={**hdr, "Content-Type": ctype}, status=(415,), param="Content-Type"))
        # -- very long header values
        add(Case(f"long-header:{short}:region", path=path, body=_j(ok), headers={HEADER: "U" * 20_000},
                 status=(400, 431), param=HEADER))
        add(Case(f"long-header:{short}:user-agent", path=path, body=_j(ok), headers={**hdr, "User-Agent": "a" * 20_000},
                 status=(431,), param="user-agent"))
        add(Case(f"long-header:{short}:cookie", path=path, body=_j(ok), headers={**hdr, "Cookie": "c=" + "x" * 100_000},
                 status=(431,), param="cookie"))

    # -- region values: the header on /chat, the model field on /v1/chat/completions
    ok_chat, _ = base("/chat")
    ok_comp, _ = base("/v1/chat/completions")
    for n, region in enumerate(HOSTILE_REGIONS):
        raw = region.encode("utf-8")
        if region == region.strip():  # a newline or edge space cannot be sent in a header at all (the client refuses)
            add(Case(f"region-header:{n}:{region[:12]!r}", body=_j(ok_chat), headers={HEADER: raw}, param=HEADER))
        add(Case(f"region-model:{n}:{region[:12]!r}", path="/v1/chat/completions", body=_j({**ok_comp, "model": region}),
                 param="model"))
    for region in NOT_FOUND_REGIONS:
        add(Case(f"region-header-unknown:{region}", body=_j(ok_chat), headers={HEADER: region}, status=(404,),
                 param=HEADER))
        add(Case(f"region-model-unknown:{region}", path="/v1/chat/completions", body=_j({**ok_comp, "model": region}),
                 status=(404,), param="model"))
    # -- wrong methods and unknown paths
    for path in ("/chat", "/v1/chat/completions"):
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            add(Case(f"method:{method}:{path}", method=method, path=path, body=None, status=(405,), param="method"))
    for method in ("POST", "DELETE", "PUT"):
        add(Case(f"method:{method}:/v1/models", method=method, path="/v1/models", body=b"{}", status=(405,),
                 param="method"))
    for path in ("/nope", "/v1/nope", "/chat/x", "/v1/chat/completion", "/v2/chat/completions", "/CHAT", "/chat%00",
                 "/%2e%2e/etc/passwd", "/v1/models/US/../../x", "/adapters/US/1/culign.json", "/" + "a" * 5000):
        add(Case(f"path:{path[:30]}", path=path, body=_j(ok_chat), status=(404,), param="path"))
    seen, unique = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique


def auth_cases(us_key: str) -> list[Case]:
    """Cases for a server with CULIGN_API_KEYS: no key, an empty one, a huge one, the wrong scheme, a wrong key, two
    headers, and a valid key (``us_key``, granted US only) asking for another region or the bare model. Each is a
    401 naming Authorization, or a 403 naming where the region came from."""
    cases: list[Case] = []
    add = cases.append
    ok_chat, hdr = base("/chat")
    ok_comp, _ = base("/v1/chat/completions")
    bad_auth = {"none": None, "empty": "", "bearer-only": "Bearer", "basic": "Basic dXM6cHc=",
                "token-scheme": f"Token {us_key}", "no-scheme": us_key, "wrong-key": "Bearer sk-not-a-key",
                "almost-key": f"Bearer {us_key[:-1]}", "key-plus": f"Bearer {us_key}x", "huge": "Bearer " + "k" * 7000,
                "unicode": "Bearer cl\u00e9", "tab": "Bearer\tsk-x"}
    for name, value in bad_auth.items():
        for path, body, h in (("/chat", ok_chat, hdr), ("/v1/chat/completions", ok_comp, {})):
            headers = dict(h) if value is None else {**h, "Authorization": value.encode("utf-8")}
            add(Case(f"auth:{name}:{path}", path=path, body=_j(body), headers=headers, status=(401,),
                     param="Authorization"))
        add(Case(f"auth:{name}:/v1/models", method="GET", path="/v1/models", body=None,
                 headers={} if value is None else {"Authorization": value.encode("utf-8")}, status=(401,),
                 param="Authorization"))
    add(Case("auth:header-too-long", path="/chat", body=_j(ok_chat), status=(431,), param="authorization",
             headers={**hdr, "Authorization": "Bearer " + "k" * 20_000}))  # over the header cap: refused before any key is hashed
    key = {"Authorization": f"Bearer {us_key}"}
    for region in ("CN", "china", "CN@1", "IN"):
        add(Case(f"auth:other-region-header:{region}", path="/chat", body=_j(ok_chat), headers={**key, HEADER: region},
                 status=(403,), param=HEADER))
        add(Case(f"auth:other-region-model:{region}", path="/v1/chat/completions",
                 body=_j({**ok_comp, "model": region}), headers=key, status=(403,), param="model"))
    add(Case("auth:base-model", path="/chat", body=_j(ok_chat), headers=key, status=(403,), param=HEADER))
    add(Case("auth:base-model-by-name", path="/v1/chat/completions", headers=key, status=(403,), param="model",
             body=_j({**ok_comp, "model": "SmolLM2-135M-Instruct"})))
    add(Case("auth:other-region-stream", path="/v1/chat/completions", headers=key, status=(403,), param="model",
             body=_j({**ok_comp, "model": "CN", "stream": True}), stream=True))
    add(Case("auth:unknown-region-not-revealed", path="/chat", body=_j(ok_chat), headers={**key, HEADER: "ATLANTIS"},
             status=(403,), param=HEADER))  # a key learns nothing of regions outside its grant, not even 404
    return cases
