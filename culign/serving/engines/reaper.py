"""The last line against orphaned engine processes.

vLLM's engine core runs in its own process (the weights, the KV cache: gigabytes and a core) and does not watch the
process that started it. When a server worker dies without closing it (SIGKILLed by the OOM killer, or exiting while
a restart was still starting one), the engine keeps running forever, and the worker that replaces it starts another.

So a worker that runs vLLM starts a reaper first: a small process that remembers the worker's descendants while the
worker lives and kills those that outlive it. It ignores the signals that stop a server (SIGTERM, SIGINT, SIGHUP to
the whole process group): it must outlive the worker to see what is left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
_started: int | None = None  # the pid that started a reaper (a forked child must start its own)


def start_reaper() -> None:
    """Start the reaper of this process's descendants, once per process."""
    global _started
    if _started == os.getpid():
        return
    # run as a file, not `-m culign...`: importing the package would load torch (~240 MB) into a process that
    # only watches pids (as a file: ~15 MB)
    subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
    _started = os.getpid()


def _descendants(pid: int) -> dict[int, float]:
    import psutil

    try:
        return {c.pid: c.create_time() for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _kill_survivors(seen: dict[int, float]) -> list[int]:
    import psutil

    killed = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:  # the same process, not a recycled pid
                p.kill()
                killed.append(pid)
        except psutil.Error:
            pass
    return killed


def main(parent: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    seen: dict[int, float] = {}
    me = os.getpid()
    while os.getppid() == parent:  # the worker lives (once it dies, this process is re-parented)
        seen.update(_descendants(parent))
        seen.pop(me, None)
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # what the worker closed on its way out has a moment to finish
    killed = _kill_survivors(seen)
    if killed:
        print(f"culign reaper: worker {parent} died and left {len(killed)} processes behind; killed {killed}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
