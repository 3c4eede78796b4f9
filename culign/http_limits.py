"""The HTTP server's header limits, the same whichever way a request's bytes arrive.

uvicorn parses requests with h11, which refuses a header block still incomplete after 16 KiB with a plain-text 400
before the ASGI app runs. Whether a large header is "incomplete" depends on how its bytes were split into reads:
the same 100 KB Cookie got culign's 431 when it arrived in one read and h11's 400 when it arrived in several.
BentoML builds uvicorn's Config itself and passes no parser limit, so culign installs its own h11 protocol as
uvicorn's ``auto`` protocol (what BentoML asks for) before the server loads it:

- the parser buffers a header block up to ``max_block`` plus :data:`FRAMING_SLACK` bytes (the hard cap: a client
  cannot make the server hold more per connection);
- below that, every request reaches the app, where HttpGuard answers 431 for a header value over ``max_value`` or
  a block over ``max_block``;
- past the hard cap the parser itself answers the same 431 with the same JSON body, then drains what the client
  still sends (so the client reads the answer instead of a connection reset) and closes.

Both paths name the largest header and give the same body, so the outcome does not depend on TCP segmentation.
uvicorn and h11 are bounded in pyproject.toml: this subclasses uvicorn's H11Protocol.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http import auto as uvicorn_auto
from uvicorn.protocols.http.h11_impl import H11Protocol

# The request line and the ": " / CRLF framing of each header are counted by h11 but not by the header sizes the
# app sees; this much slack keeps the app's check (headers only) the one that decides near the cap.
FRAMING_SLACK = 16 * 1024
DRAIN_LIMIT_FACTOR = 16  # after a refusal, read and drop at most this many hard caps before closing
DRAIN_SECONDS = 5.0  # ... and for at most this long


def too_large_body(name: str, max_value: int, max_block: int) -> bytes:
    """The one 431 body, from the app or the parser: names the header, never echoes its value."""
    name = name[:40]
    message = (f"header {name!r} is too large: a header value may have at most {max_value} bytes and all headers "
               f"together at most {max_block}")
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": name,
                                 "code": 431}}).encode()


def largest_header(headers) -> str:
    """The name of the largest of ``(name, value)`` byte pairs (``""`` if none)."""
    best = max(headers, key=lambda nv: len(nv[0]) + len(nv[1]), default=(b"", b""))
    return best[0].decode("latin-1").lower()


def _largest_in_raw(head: bytes) -> str:
    """The largest header in an incomplete raw header block; its last line may be cut, and may have no colon yet."""
    lines = head.split(b"\r\n")[1:]  # the request line is not a header
    pairs = [tuple(line.split(b":", 1)) if b":" in line else (line[:40], b"") for line in lines if line]
    return largest_header(pairs) if pairs else "request-line"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with culign's header hard cap and a JSON 431 past it."""

    max_value = 8192
    max_block = 64 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_block + FRAMING_SLACK)
        self._drained: int | None = None  # bytes dropped since a refusal; None while the connection is normal

    def data_received(self, data: bytes) -> None:
        if self._drained is None:
            return super().data_received(data)
        self._drained += len(data)
        if self._drained > DRAIN_LIMIT_FACTOR * (self.max_block + FRAMING_SLACK):
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        head, _ = self.conn.trailing_data
        if len(head) <= self.max_block + FRAMING_SLACK:
            return super().send_400_response(msg)  # malformed, not oversized: uvicorn's own answer
        self.logger.warning("refused a header block over %d bytes (431)", self.max_block + FRAMING_SLACK)
        body = too_large_body(_largest_in_raw(head), self.max_value, self.max_block)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=431, headers=headers,
                                                         reason=b"Request Header Fields Too Large")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        # Closing now, with the client's bytes unread, would send a reset that can destroy the answer before the
        # client reads it: end our side, drop what still comes (bounded), close when the client does or later.
        self._drained = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(DRAIN_SECONDS, self.transport.close)


def install(max_value: int, max_block: int) -> None:
    """Make :class:`GuardedH11Protocol` uvicorn's ``auto`` HTTP protocol, with these limits.

    uvicorn resolves ``auto`` when its server loads (after the service module is imported), so this must run at
    import time of the service. It also replaces httptools where that is installed: one parser, one behaviour.
    """
    GuardedH11Protocol.max_value, GuardedH11Protocol.max_block = max_value, max_block
    uvicorn_auto.AutoHTTPProtocol = GuardedH11Protocol
