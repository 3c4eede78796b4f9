"""Send one hostile case and judge the answer: a 4xx (the case's status), a JSON error body naming the parameter,
within the time limit, and no stream started for a refused stream request."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from .corpus import Case

LIMIT_S = 30.0


@dataclass
class Outcome:
    status: int | None  # None: no answer (hang, or the connection dropped)
    seconds: float
    content_type: str = ""
    body: object = None
    text: str = ""
    error: str = ""  # transport error, if any

    @property
    def klass(self) -> str:
        if self.status is None:
            return "hang" if "timed out" in self.error.lower() or "timeout" in self.error.lower() else "dropped"
        return f"{self.status // 100}xx"


def send(client: httpx.Client, url: str, case: Case, limit: float = LIMIT_S) -> Outcome:
    headers = dict(case.headers)
    if case.body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    content = case.body
    if case.chunked and content is not None:
        data = content

        def chunks():
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]
        content = chunks()
    t0 = time.monotonic()
    try:
        with client.stream(case.method, url + case.path, content=content, headers=headers,
                           timeout=httpx.Timeout(limit)) as r:
            raw = b""
            for chunk in r.iter_bytes():
                raw += chunk
                if len(raw) > 1 << 20 or time.monotonic() - t0 > limit:
                    break
            seconds = time.monotonic() - t0
            ctype = r.headers.get("content-type", "")
            text = raw.decode("utf-8", "replace")
            try:
                body = json.loads(raw) if "json" in ctype else None
            except ValueError:
                body = None
            return Outcome(r.status_code, seconds, ctype, body, text)
    except httpx.HTTPError as e:
        return Outcome(None, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")


def problems(case: Case, out: Outcome, limit: float = LIMIT_S) -> list[str]:
    """What is wrong with the server's answer to ``case``; [] when it is what a correct server says."""
    if out.status is None:
        return [f"no answer in {out.seconds:.1f} s ({out.error[:200]})"]
    found = []
    if out.seconds > limit:
        found.append(f"took {out.seconds:.1f} s (limit {limit:.0f} s)")
    if out.status not in case.status:
        found.append(f"status {out.status}, expected {'/'.join(map(str, case.status))}: {out.text[:300]!r}")
    if 200 <= out.status < 300:
        return found
    if case.stream and "event-stream" in out.content_type:
        found.append("a refused stream request started a stream")
    error = out.body.get("error") if isinstance(out.body, dict) else None
    if not isinstance(error, dict):
        found.append(f"not a JSON error body ({out.content_type or 'no content type'}): {out.text[:200]!r}")
        return found
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        found.append(f"error body lacks {missing}: {error}")
    param = error.get("param")
    wanted = case.param if isinstance(case.param, tuple) else (case.param,) if case.param else ()
    if not isinstance(param, str) or not param:
        found.append(f"error.param is {param!r}: the parameter is not named ({error.get('message')!r:.200})")
    elif wanted and not any(param.lower().startswith(w.lower()) for w in wanted):
        found.append(f"error.param is {param!r}, expected {' or '.join(wanted)} ({error.get('message')!r:.200})")
    return found


def send_raw(url: str, request: bytes, chunk: int | None, limit: float = LIMIT_S) -> tuple[int | None, str, bytes]:
    """Write ``request`` over a raw socket, in one write or in ``chunk``-byte writes (each its own TCP segment,
    with a pause so the server reads them apart), while reading the answer; ``(status, content type, body)``.

    httpx always writes a request head in one piece; real clients and proxies do not, and the server's parser
    answered differently depending on how a large header was split (issue 20)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write():
        try:
            if chunk is None:
                sock.sendall(request)
            else:
                for i in range(0, len(request), chunk):
                    sock.sendall(request[i:i + chunk])
                    time.sleep(0.001)
        except OSError:
            pass  # the server may close once it has answered; the answer is what is judged

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < _answer_length(data):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    except OSError:
        pass
    finally:
        sock.close()
        writer.join(limit)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None, "", data
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    return status, fields.get("content-type", ""), body[:int(fields.get("content-length", len(body)))]


def _answer_length(data: bytes) -> int:
    """Bytes of a whole answer whose head is in ``data`` (head + Content-Length); unknown length: wait for EOF."""
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(head) + 4 + int(value)
    return 1 << 62
