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

Keys rotate without a restart: :class:`KeyRing` re-reads the file when it changes (and when told to: SIGHUP). A
file that does not load keeps the last good keys in force, and says so once in the log and on ``/metrics``: a
half-written or mistyped file never opens the service, nor locks everyone out.

Knows nothing of HTTP: service.py turns :class:`AuthError` into a 401 and a region outside the key's into a 403.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ApiKeyFileError", "ApiKeys", "AuthError", "BASE", "Grant", "KeyRing", "MAX_KEY_BYTES"]

log = logging.getLogger("culign.auth")

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
    key_id: str = field(default="", compare=False)  # stable across rotations (a hash of the stored hash): for the
    # per-key admission share; reveals nothing of the key

    def allows(self, region: str | None) -> bool:
        if self.regions is None:
            return True
        return (BASE if region is None else region.upper()) in self.regions


class ApiKeys:
    def __init__(self, entries: list[tuple[bytes, Grant]], source: str):
        self._entries, self.source = entries, source

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def key_ids(self) -> set[str]:
        return {grant.key_id for _, grant in self._entries}

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
            key_id = hashlib.sha256(bytes.fromhex(digest)).hexdigest()[:16]
            entries.append((bytes.fromhex(digest), Grant(regions, f"key {len(entries) + 1} (line {n})", key_id)))
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


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file (editors replace it: a new inode; appends change the size and time)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class KeyRing:
    """The keys in force, from a file that may change while serving. ``check`` answers from the last good load.

    ``watch()`` starts a thread that polls the file's inode, size and time every ``interval`` seconds and reloads it
    when they change; ``reload()`` does it at once (SIGHUP). A file that fails to load leaves the last good keys in
    force: ``file_refused`` is True (``/metrics``) and the reason is logged once per bad version of the file.
    """

    def __init__(self, path: Path, interval: float = 1.0):
        self.path, self.interval = Path(path), interval
        self.keys = ApiKeys.load(self.path)  # at startup a bad file is fatal: there are no last good keys yet
        self.source = self.keys.source
        self._signature = _signature(self.path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reloads = 0  # loads that replaced the keys, since start
        self.file_refused = False  # the file on disk is not the one in force: it did not load
        self.last_error: str | None = None
        self._refused_signature: tuple | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def check(self, authorization: str | None) -> Grant:
        return self.keys.check(authorization)

    def reload(self, why: str = "changed") -> bool:
        """Load the file again now; True when the keys in force were replaced."""
        with self._lock:
            signature = _signature(self.path)
            try:
                fresh = ApiKeys.load(self.path)
            except ApiKeyFileError as e:
                self._signature = signature
                first = signature != self._refused_signature or not self.file_refused
                self.file_refused, self.last_error, self._refused_signature = True, str(e), signature
                if first:  # once per bad version of the file, not at every poll
                    log.error("API keys file %s (%s) refused, keeping the %d keys in force: %s", self.path, why,
                              len(self.keys), e)
                return False
            old, new = self.keys.key_ids, fresh.key_ids
            self.keys, self._signature = fresh, signature
            self.file_refused, self.last_error, self._refused_signature = False, None, None
            self.reloads += 1
        log.warning("API keys reloaded from %s (%s): %d keys, %d added, %d removed", self.path, why, len(fresh),
                    len(new - old), len(old - new))
        return True

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="culign-keys-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if _signature(self.path) != self._signature:
                self.reload("changed")

    def close(self) -> None:
        self._stop.set()
