"""An engine that comes back by itself: the service's engine, watched and restarted in-process when it dies.

vLLM runs its model in a separate engine process, which the kernel's OOM killer (or a crash) can take down while
the service's worker lives on; culign's own engine is one decode thread, which a bug can end. Either way the
engine's in-flight requests end at once with an error (the engines see to that: never a hang, never a truncated
200), and from then on every request would fail until a person noticed. The supervisor notices instead: it polls
the engine's health, and on a death it says why in the log, refuses new requests with a 503 while it works
(``/readyz`` is 503 too), closes what is left of the dead engine (its process reaped: no zombies), and starts a
fresh one over the same loaded model and registry. If a start fails ``max_failures`` times in a row it gives up:
``/livez`` turns 503 and ``on_give_up`` runs (the service exits non-zero so that its supervisor, BentoML's
arbiter, systemd or Kubernetes, restarts the whole worker).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .base import Engine, Invariance, Job, ShuttingDown, Stats

log = logging.getLogger("culign.supervisor")

__all__ = ["EngineRestarting", "Supervisor"]


class EngineRestarting(ShuttingDown):
    """The engine died and is being restarted: try again in a moment (503 with Retry-After)."""

    retry_after = 5


class Supervisor:
    """The engine seam (:class:`.base.Engine`) over whichever engine ``start()`` builds, restarted when it dies.

    Counters (``stats``) carry over from one engine to the next, so ``/metrics`` counts since the service started;
    ``restarts`` counts the engines started after the first, ``last_recovery_s`` how long the last took.
    """

    def __init__(self, start: Callable[[], Engine], *, max_failures: int = 3, poll_s: float = 0.25,
                 backoff_s: float = 1.0, on_give_up: Callable[[str], None] | None = None):
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self._start, self.max_failures, self.poll_s, self.backoff_s = start, max_failures, poll_s, backoff_s
        self._on_give_up = on_give_up
        self.engine: Engine = start()  # the first start fails loudly: a service that never served exits at once
        self.name = self.engine.name
        self.max_rows, self.max_queue = self.engine.max_rows, self.engine.max_queue
        self.restarts = 0
        self.last_death: str | None = None
        self.last_recovery_s: float | None = None
        self.gave_up = False
        self._restarting = False
        self._closing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="culign-engine-supervisor", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the seam
    @property
    def stats(self) -> Stats:
        return self.engine.stats

    @property
    def queued(self) -> int:
        return self.engine.queued

    def submit(self, request, label: str = "", region: str | None = None) -> Job:
        if self.gave_up:
            raise ShuttingDown("the engine could not be restarted; the service is exiting")
        if self._restarting:
            raise EngineRestarting(f"the {self.name} engine stopped ({self.last_death}) and is restarting; retry in "
                                   "a few seconds")
        return self.engine.submit(request, label, region)

    def invariance(self) -> Invariance:
        return self.engine.invariance()

    def alive(self) -> bool:
        """Ready to serve (``/readyz``): False while the engine is being restarted, and once given up."""
        return not self._restarting and not self.gave_up and self.engine.alive()

    def live(self) -> bool:
        """Worth keeping (``/livez``): False only once restarting has failed ``max_failures`` times in a row."""
        return not self.gave_up

    def close(self) -> None:
        self._closing = True
        self._stop.set()
        self.engine.close()

    # ------------------------------------------------------------------ watching
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._closing or self.engine.alive():
                continue
            why = getattr(self.engine, "death", None) or "it stopped"
            try:
                self._restart(why)
            except Exception:  # never expected: the watcher must outlive anything a restart throws at it
                log.exception("the engine supervisor failed while restarting")
            if self.gave_up:
                return

    def _restart(self, why: str) -> None:
        self._restarting, self.last_death = True, why
        died_at = time.monotonic()
        old = self.engine
        log.error("the %s engine died (%s): its in-flight requests ended with 503; restarting it", self.name, why)
        try:
            old.close()  # what is left of it: a dead vLLM engine's process is reaped here, so none is left behind
        except Exception as e:  # noqa: BLE001 - a half-dead engine may fail to close; the new one matters
            log.warning("closing the dead engine failed (%s: %s)", type(e).__name__, e)
        # SIGTERM reaches vLLM's engine process as it reaches the worker, so a shutdown can look like a death for a
        # moment: give the worker's own handler time to say it is closing before anything new is started
        self._stop.wait(max(self.poll_s, 0.5))
        for attempt in range(1, self.max_failures + 1):
            if self._closing:
                return
            try:
                fresh = self._start()
            except Exception as e:  # noqa: BLE001 - any failure to start counts
                log.error("restart %d of %d failed: %s: %s", attempt, self.max_failures, type(e).__name__, e)
                if attempt < self.max_failures:
                    self._stop.wait(self.backoff_s * attempt)
                continue
            if self._closing:  # the service began to shut down while it started: never leave it behind
                fresh.close()
                return
            stats = old.stats
            stats.rows_in_flight = 0
            fresh.stats = stats  # counts since the service started, not since this engine did
            self.engine = fresh
            self.restarts += 1
            self.last_recovery_s = time.monotonic() - died_at
            self._restarting = False
            log.warning("the %s engine is back after %.1f s (restart %d since start)", self.name,
                        self.last_recovery_s, self.restarts)
            return
        self.gave_up = True
        reason = f"the {self.name} engine died ({why}) and {self.max_failures} restarts in a row failed"
        log.critical("%s: giving up", reason)
        if self._on_give_up is not None:
            self._on_give_up(reason)
