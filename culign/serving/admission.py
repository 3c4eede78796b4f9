"""Fair admission per API key: no key may hold more than its share of the engine's places.

The engine's bound is global (``max_rows`` decoded + ``max_queue`` waiting), so without a share one client that
floods the service fills every place and everyone else gets 429. With API keys on, each key may hold at most
``share`` of those places at once (CULIGN_KEY_SHARE, default one half): a key over it gets 429 with Retry-After
while other keys are still admitted. Without keys (no key to tell clients apart) nothing changes.
"""
from __future__ import annotations

import math
import threading
from collections import Counter

from .engines.base import Stats

__all__ = ["KeyShareExceeded", "KeyShares"]


class KeyShareExceeded(Exception):
    """This key holds its whole share already; ``retry_after`` seconds is a rough hint."""

    def __init__(self, held: int, limit: int, capacity: int, retry_after: int):
        super().__init__(f"this API key has {held} requests in flight or waiting, its share of the server's "
                         f"{capacity} places ({limit}); retry after {retry_after} s")
        self.held, self.limit, self.capacity, self.retry_after = held, limit, capacity, retry_after


class KeyShares:
    """Places held per key (taken at admission, given back when the request ends, however it ends)."""

    def __init__(self, capacity: int, share: float):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.capacity, self.share = capacity, share
        self.limit = max(1, math.floor(share * capacity))
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()  # taken on the event loop, given back from the engine's thread
        self.refused = 0

    def take(self, key: str, stats: Stats | None = None) -> None:
        """Take a place for ``key``, or raise KeyShareExceeded (its Retry-After from the engine's ``stats``)."""
        with self._lock:
            held = self._held[key]
            if held >= self.limit:
                self.refused += 1
                retry = stats.retry_after(held) if stats is not None else 1
                raise KeyShareExceeded(held, self.limit, self.capacity, retry)
            self._held[key] = held + 1

    def give_back(self, key: str) -> None:
        with self._lock:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

    def held(self, key: str) -> int:
        with self._lock:
            return self._held[key]
