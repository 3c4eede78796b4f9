"""Start and stop the real server (``bentoml serve service:Culign`` on 127.0.0.1) over a copy of the registry, and
measure it (RSS of the server and its workers, a normal request's latency)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
REGIONS = ("US", "CN", "IN", "SA")
CAP = 32  # CULIGN_MAX_TOKENS of the server under test: load asks 8..32; larger is a 400
NORMAL = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}


def copy_registry(root: Path, versions=(1, 2)) -> Path:
    """The committed registry's versions of every region, copied folder by folder (each keeps its number)."""
    from culign.registry import Registry

    committed = Registry(REPO / "adapters")
    for info in committed.scan()[0]:
        if info.version in versions:
            shutil.copytree(info.path, root / info.region / str(info.version))
    return root


def failure_excerpt(log: Path, tail: int = 3000) -> str:
    """What a failed start printed: its first traceback or error line onwards (the root cause, which a restarting
    worker pushes out of the tail), then the tail."""
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines)
                  if "Traceback (most recent call last)" in line or "[ERROR]" in line or " ERROR " in line), None)
    head = "" if first is None else "\n".join(lines[max(first - 5, 0):first + 60])
    if head and head in text[-tail:]:
        head = ""
    return (f"--- first error ---\n{head}\n--- last {tail} characters ---\n" if head else "") + text[-tail:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    registry: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> dict[str, float]:
        """RSS in MB: the server process, its largest worker, all of them."""
        import psutil

        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {"server": 0.0, "worker": 0.0, "total": 0.0}
        rss = []
        for p in procs:
            try:
                rss.append(p.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                rss.append(0.0)
        return {"server": rss[0], "worker": max(rss[1:], default=0.0), "total": sum(rss)}

    def normal(self, client: httpx.Client | None = None, region: str = "US", timeout: float = 60) -> httpx.Response:
        c = client or httpx
        return c.post(f"{self.url}/chat", json=NORMAL, headers={"X-Culign-Region": region}, timeout=timeout)

    def alive(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False


@contextmanager
def serve(workdir: Path, registry: Path, ready_timeout: float = 300, **env_overrides):
    """The real server over ``registry``; yields a :class:`Server`; stops its whole session at the end.
    ``ready_timeout``: seconds to wait for /readyz (a bigger model on a busy machine needs more)."""
    port = free_port()
    env = {**os.environ, "CULIGN_ADAPTERS": str(registry), "CULIGN_MAX_TOKENS": str(CAP),
           "CULIGN_RESCAN_SECONDS": "1", "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "HF_HUB_OFFLINE": "1", "CULIGN_ENGINE": "culign",  # vLLM only where a test asks (it starts in ~30 s)
           **{k: str(v) for k, v in env_overrides.items()}}
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Culign", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{failure_excerpt(log)}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout:.0f} s:\n{failure_excerpt(log)}")
            time.sleep(0.5)
        yield Server(url, proc, log, registry)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers, nothing else
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass


def record(part: str, **fields) -> None:
    """One line of the suite's results (CULIGN_RELIABILITY_OUT), read by reliability/summary.py."""
    out = os.environ.get("CULIGN_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"part": part, **fields}, default=str) + "\n")
