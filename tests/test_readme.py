"""The README's commands hold: the two setup targets exist, every `culign` line of "First steps" names a real
subcommand with real options (its --help runs and lists each option used), the cheap ones run for real on the
embedded model, and every page it links to exists; the README stays a one-minute read."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from reliability.harness import REPO

README = (REPO / "README.md").read_text()


def _block(after: str) -> list[str]:
    text = README.split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]


def _culign(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "culign.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_the_readme_is_short_and_its_links_exist():
    assert len(README.encode()) <= 12 * 1024
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (REPO / link).exists(), link


def test_the_two_setup_commands():
    setup = _block("## Setup: two commands")
    assert [ln.split()[:2] for ln in setup if not ln.lstrip().startswith("#")] == [["make", "demo"], ["make", "test"]]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


CULIGN_LINES = [ln.split("#")[0].strip() for ln in _block("## First steps") if ln.startswith(".venv/bin/culign")]


@pytest.mark.parametrize("line", CULIGN_LINES)
def test_each_culign_line_is_a_real_command(line):
    words = shlex.split(line)[1:]
    sub = [w for w in words if not w.startswith("-")][:2]
    sub = sub[:2] if sub[0] == "adapters" else sub[:1]
    r = _culign(*sub, "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in r.stdout, f"{line}: {option} is not an option of culign {' '.join(sub)}"


@pytest.mark.real
def test_the_cheap_lines_run(tmp_path):
    listed = _culign("adapters", "list", "--adapters-dir", "adapters", "--json")
    assert listed.returncode == 0 and {"US", "CN", "IN", "SA"} <= {a["region"] for a in json.loads(listed.stdout)["adapters"]}


def test_the_serve_lines():
    lines = _block("## First steps")
    assert any(ln.startswith(".venv/bin/bentoml serve service:Culign") for ln in lines)
    assert (REPO / "service.py").exists()
    curl = next(ln for ln in lines if ln.startswith("curl"))
    body = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
    assert body["model"] == "US" and body["messages"][0]["role"] == "user"
