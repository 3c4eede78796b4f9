"""The serving image built end to end with no registry and no Docker daemon: deploy/build-image.sh (debootstrap base,
bentoml build, bentoml containerize --backend buildah, the image run and asked for /v1/models and a US chat).

Slow (minutes, a few GB of disk) and root-only: run with ``CULIGN_IMAGE_TEST=1 pytest -m image`` or
``make image``. CI runs `bentoml build` and checks the generated Dockerfile instead (test_service.py).
"""
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.image,
              pytest.mark.skipif(os.environ.get("CULIGN_IMAGE_TEST") != "1",
                                 reason="slow: set CULIGN_IMAGE_TEST=1 to build and run the image")]


@pytest.mark.parametrize("engine", ["culign", "vllm"])
def test_build_image_script_builds_and_serves(tmp_path, engine):
    for tool in ("debootstrap", "buildah"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install buildah debootstrap")
    work = Path(os.environ.get("CULIGN_IMAGE_WORKDIR", tmp_path / "image"))  # reuse one to keep the wheelhouse
    proc = subprocess.run(["bash", "deploy/build-image.sh", "--engine", engine, "--workdir", str(work), "--tag",
                           f"culign:test-{engine}"],
                          cwd=REPO, capture_output=True, text=True, timeout=3000)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cold start (process start to /readyz)" in out
    assert f"({engine} engine)" in out and "/v1/models and a US chat completion OK" in out
    with pytest.raises(OSError):  # the script stopped the server it started, workers included
        socket.create_connection(("127.0.0.1", 3311), timeout=2).close()
    # the image's Python has the CPU build of torch, never the CUDA one
    dockerfile = next((work / "bentoml" / "bentos" / "culign").glob("*/env/docker/Dockerfile")).read_text()
    assert "FROM localhost/culign-base:bookworm" in dockerfile
    requirements = next((work / "bentoml" / "bentos" / "culign").glob("*/env/python/requirements.txt")).read_text()
    assert "+cpu" in requirements
