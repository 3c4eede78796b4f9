"""API keys: who may call the service, and which regions each key may use.

``CULIGN_API_KEYS`` names a file with one key per line, stored as the sha256 of the key (hex), optionally followed
by the regions the key may use (comma- or space-separated; ``base`` is the model with no adapter; none listed: every
region and the base model)::

    # culign API keys: sha256(key) [REGIONS]
    3f0a...e1            # all regions
    9b71...0c US,CN      # only US and CN (not the bare model)
    51d2...7a base CN    # the bare model and CN

An entry is made with ``printf %s "$KEY" | sha256sum``. Keys never appear in the file or in a log line; a presented
key is hashed and compared against every stored hash with ``hmac.compare_digest`` (no early exit), so the time
taken says nothing about how close a guess was.

Knows nothing of HTTP: service.py turns :class:`AuthError` into a 401 and a region outside the key's into a 403.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ApiKeyFileError", "ApiKeys", "AuthError", "BASE", "Grant", "MAX_KEY_BYTES"]

BASE = "base"  # the bare model, no soft prompt
_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_KEY_BYTES = 512  # a longer Authorization value is no key of ours: refused without hashing megabytes


class ApiKeyFileError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


class AuthError(Exception):
    """No valid key was presented (HTTP 401)."""


@dataclass(frozen=True)
class Grant:
    """What one key may use: ``regions`` None = everything; else region names (upper case) and maybe ``base``."""
    regions: frozenset[str] | None
    label: str  # "key 3 (line 7)": how logs and metrics may name a key without revealing it

    def allows(self, region: str | None) -> bool:
        if self.regions is None:
            return True
        return (BASE if region is None else region.upper()) in self.regions


class ApiKeys:
    def __init__(self, entries: list[tuple[bytes, Grant]], source: str):
        self._entries, self.source = entries, source

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> "ApiKeys":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeyFileError(f"CULIGN_API_KEYS={path}: cannot read it ({e})") from None
        entries: list[tuple[bytes, Grant]] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            digest, *rest = line.split(None, 1)
            digest = digest.lower()
            if not _HEX.match(digest):
                raise ApiKeyFileError(f"{path}, line {n}: expected the sha256 of a key (64 hex digits), got "
                                      f"{len(digest)} characters (store the hash, never the key)")
            names = [r for r in re.split(r"[,\s]+", rest[0]) if r] if rest else []
            for r in names:
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", r):
                    raise ApiKeyFileError(f"{path}, line {n}: {r[:40]!r} is not a region name")
            regions = frozenset(r.lower() if r.lower() == BASE else r.upper() for r in names) or None
            entries.append((bytes.fromhex(digest), Grant(regions, f"key {len(entries) + 1} (line {n})")))
        if not entries:
            raise ApiKeyFileError(f"CULIGN_API_KEYS={path} holds no key: every request would be refused")
        return cls(entries, str(path))

    def check(self, authorization: str | None) -> Grant:
        """The grant of the key in an ``Authorization: Bearer <key>`` value; AuthError when there is none."""
        if not authorization:
            raise AuthError("missing API key: send Authorization: Bearer <key>")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("the Authorization header must use the Bearer scheme")
        key = key.strip()
        if not key or len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
            raise AuthError("invalid API key")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Grant | None = None
        for stored, grant in self._entries:  # every entry, whatever matched: the time does not depend on which
            if hmac.compare_digest(digest, stored) and found is None:
                found = grant
        if found is None:
            raise AuthError("invalid API key")
        return found
