"""The engine seam: what the chat service hands an inference engine, and what it gets back.

In: a :class:`~culign.model.decoding.GenerationRequest` (token ids, a soft prompt or none, sampling settings). Out:
a :class:`Job` whose ``tokens()`` yields :class:`~culign.model.decoding.Token` (id, and logprobs when asked), which
the caller may ``cancel()``. An engine is bounded: ``submit`` raises :class:`QueueFull` at once past its queue,
never blocks, and :class:`ShuttingDown` once closing. Two engines implement it: culign's own scheduler
(:mod:`.scheduler`) and vLLM (:mod:`.vllm`), both built by :func:`culign.serving.engines.build_engine`. Like vLLM's
``EngineClient`` (generate, abort, health), it knows nothing of HTTP, regions or the registry: the chat service
(:mod:`culign.serving.chat`) owns those, for both engines alike.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from ...model import decoding
from ...model.decoding import GenerationRequest, Token

__all__ = ["Engine", "Invariance", "Job", "QueueFull", "RowFailed", "ShuttingDown", "Stats", "Token"]


class QueueFull(Exception):
    """Too many requests waiting: try again after ``retry_after`` seconds."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"{queued} requests are waiting already")
        self.queued, self.retry_after = queued, retry_after


class ShuttingDown(Exception):
    """The scheduler is closing: the request was not (or no longer) decoded."""


class RowFailed(Exception):
    """This request failed inside the worker; no other request saw the error."""


_END = object()


class Job:
    """One request: the worker pushes its tokens onto an asyncio queue owned by the caller's event loop."""

    def __init__(self, request: GenerationRequest, stop_ids: set[int], loop: asyncio.AbstractEventLoop,
                 label: str = "", region: str | None = None):
        self.request, self._stop_ids, self._loop = request, stop_ids, loop
        self.label, self.region = label, region
        self._queue: asyncio.Queue = asyncio.Queue()
        self.produced = 0
        self.finished = False
        self.cancelled = False  # set by cancel() (client gone, stop string matched): the row leaves next step
        self.submitted_at = time.monotonic()
        self.on_cancel: Callable[[], None] | None = None  # what an engine does beyond the flag (vLLM: abort)
        self._on_finish: list[Callable[[], None]] | None = []  # None once they have run
        self._callbacks_lock = threading.Lock()

    # worker side
    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is listening
            self.cancelled = True

    def _push(self, token: Token) -> None:
        self.produced += 1
        self._put(token)
        if decoding.finished(token.id, self.produced, self.request, self._stop_ids):  # the one stop rule
            self._finish()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            if error is not None:
                self._put(error)
            self._put(_END)
            with self._callbacks_lock:
                callbacks, self._on_finish = self._on_finish or [], None
            for callback in callbacks:
                callback()

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the job has ended, however it ends (at once if it has): from the engine's thread."""
        with self._callbacks_lock:
            if self._on_finish is not None:
                self._on_finish.append(callback)
                return
        callback()

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    # caller side
    def cancel(self) -> None:
        """The caller stops listening: the engine stops decoding this request (a no-op once it has finished)."""
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None and not self.finished:
                self.on_cancel()

    async def tokens(self) -> AsyncIterator[Token]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class Stats:
    """What /metrics and the bench read; written by the worker thread only."""
    steps: int = 0  # decode steps run
    step_rows: int = 0  # rows over all steps (step_rows / steps = mean rows per step)
    tokens: int = 0
    prefills: int = 0
    rejected: int = 0  # QueueFull
    failed_rows: int = 0
    cancelled_rows: int = 0
    rows_in_flight: int = 0
    requests_by_region: Counter = field(default_factory=Counter)
    _recent: deque = field(default_factory=lambda: deque(maxlen=256), repr=False)  # (time, tokens) per step

    def record_step(self, rows: int, tokens: int) -> None:
        self.steps += 1
        self.step_rows += rows
        self.tokens += tokens
        self._recent.append((time.monotonic(), tokens))

    def retry_after(self, ahead: int, answer_tokens: int = 64) -> int:
        """Seconds until ``ahead`` requests have been answered at the current rate (an answer being about
        ``answer_tokens`` tokens): a rough, honest Retry-After hint, 1 to 60."""
        rate = self.tokens_per_s()
        return 1 if rate <= 0 else max(1, min(60, math.ceil(ahead * answer_tokens / rate)))

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0])


@dataclass(frozen=True)
class Invariance:
    """Whether a greedy answer is the same alone and in any batch, in this engine's configuration, and why."""
    batch_invariant: bool
    why: str

    def as_dict(self) -> dict:
        return {"batch_invariant": self.batch_invariant, "why": self.why}


class Engine(Protocol):
    """What the chat service needs from an inference engine."""
    name: str  # "culign" or "vllm"
    max_rows: int  # requests decoded together
    max_queue: int  # requests waiting beyond those; past it, QueueFull
    stats: Stats

    @property
    def queued(self) -> int: ...

    def submit(self, request: GenerationRequest, label: str = "", region: str | None = None) -> Job:
        """Start a request; call from inside the event loop that will read the job's tokens. Never blocks."""

    def invariance(self) -> Invariance: ...

    def alive(self) -> bool: ...

    def close(self) -> None:
        """Stop admitting; running requests get the grace, then end with ShuttingDown."""
