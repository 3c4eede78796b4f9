"""Property-based requests from the live server's own OpenAPI document (``/docs.json``), drawn with schemathesis
(positive: bodies the schema allows; negative: bodies it forbids), sent with a region header picked in turn."""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass

HEADERS = ["US", "CN@1", "IN", "SA@2", None, "Atlantis", "US@999", "../US"]


@dataclass
class Drawn:
    mode: str
    path: str
    case: object  # schemathesis.Case

    def key(self) -> str:
        body = self.case.body
        body = body.decode("latin-1") if isinstance(body, bytes) else body
        try:
            text = json.dumps(body, sort_keys=True, default=repr)
        except (TypeError, ValueError):
            text = repr(body)
        return f"{self.mode} {self.path} {self.case.media_type} {text}"


def draw(openapi: dict, path: str, mode: str, n: int, seed: int = 0) -> list[Drawn]:
    """``n`` distinct examples for ``POST path`` in ``mode`` ('positive' or 'negative'), deterministic."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(openapi)
    ops = [r.ok() for r in schema.get_all_operations()]
    op = next(o for o in ops if o.path == path and o.method.upper() == "POST")
    out: list[Drawn] = []
    seen: set[str] = set()

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=3 * n, database=None, deadline=None, derandomize=False, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(op.as_strategy(generation_mode=GenerationMode(mode)))
    def collect(case):
        d = Drawn(mode, path, case)
        if len(out) < n and d.key() not in seen:
            seen.add(d.key())
            out.append(d)

    collect()
    return out


def send(drawn: list[Drawn], url: str, limit: float = 30.0) -> list[dict]:
    """Send every drawn case; one record each: status (None on no answer), seconds, JSON error or not, param."""
    records = []
    headers = itertools.cycle(HEADERS)
    for d in drawn:
        region = next(headers)
        extra = {"X-Culign-Region": region} if region and d.path == "/chat" else {}
        t0 = time.monotonic()
        try:
            r = d.case.call(base_url=url, headers=extra, timeout=limit)
            status, ctype, content = r.status_code, r.headers.get("content-type", [""]), r.content
            ctype = ctype[0] if isinstance(ctype, list) else ctype
        except Exception as e:  # noqa: BLE001 - a timeout or a dropped connection is a result here
            records.append({"key": d.key()[:300], "status": None, "seconds": time.monotonic() - t0,
                            "error": f"{type(e).__name__}: {e}"[:300], "region": region})
            continue
        rec = {"key": d.key()[:300], "status": status, "seconds": time.monotonic() - t0, "region": region,
               "content_type": ctype}
        if status >= 400:
            try:
                err = json.loads(content).get("error", {})
                rec["param"] = err.get("param")
                rec["message"] = str(err.get("message"))[:200]
            except (ValueError, AttributeError):
                rec["param"] = None
                rec["message"] = content[:200].decode("utf-8", "replace")
        records.append(rec)
    return records
