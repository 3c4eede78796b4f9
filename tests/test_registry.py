"""Adapter registry on real files: round trips, PEFT compatibility, corruption, killed saves, names, removal."""
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import culign
from culign.registry import (PAUSE_ENV, STALE_AFTER_S, AdapterCorrupt, AdapterIncompatible, AdapterNotFound,
                             Registry, RegistryError)

HIDDEN = 64
FP = "sha256:base"
REPO = Path(__file__).resolve().parents[1]


def _prompt(n=5, seed=0, hidden=HIDDEN):
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def _save(reg, region="DE", n=5, seed=0, hidden=HIDDEN, **provenance):
    return reg.save(region, _prompt(n, seed, hidden), base_model="tiny", base_fingerprint=FP,
                    provenance={"loss": 0.5, "heldout_loss": 0.75, **provenance})


def _flip_byte(path: Path, offset_from_end: int = 3):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ round trip
def test_save_load_round_trip_and_versions(tmp_path):
    reg = Registry(tmp_path / "adapters")
    first = reg.save("DE", _prompt(seed=1), base_model="tiny", base_fingerprint=FP,
                     provenance={"loss": 0.5, "heldout_loss": 0.75, "generations": 40},
                     files={"report.json": b'{"ok": true}', "radar.png": b"\x89PNG"})
    second = _save(reg, seed=2)
    assert (first.ref, second.ref) == ("DE@1", "DE@2")
    assert reg.versions("DE") == [1, 2] and reg.regions() == ["DE"]
    assert reg.resolve("DE").version == 2 and reg.resolve("DE", 1) == first

    loaded = reg.load("DE", 1, hidden_size=HIDDEN, base_fingerprint=FP)
    assert loaded.prompt.dtype == torch.float32 and torch.equal(loaded.prompt, _prompt(seed=1))
    assert loaded.info == first and (first.loss, first.heldout_loss) == (0.5, 0.75)
    assert torch.equal(reg.load("DE").prompt, _prompt(seed=2))

    folder = tmp_path / "adapters" / "DE" / "1"
    assert (folder / "report.json").read_bytes() == b'{"ok": true}' and (folder / "radar.png").exists()
    raw = (folder / "culign.json").read_text()
    prov = json.loads(raw)
    assert list(prov) == sorted(prov) and prov == loaded.provenance
    assert prov["generations"] == 40 and prov["region"] == "DE" and prov["version"] == 1
    assert prov["base_model"] == "tiny" and prov["base_fingerprint"] == FP and prov["dtype"] == "float32"
    assert (prov["num_virtual_tokens"], prov["token_dim"]) == (5, HIDDEN)
    assert prov["culign_version"] == culign.__version__ and prov["created"].endswith("+00:00")
    assert prov["weights_sha256"] == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    json.dumps(first.to_dict())  # JSON-friendly
    assert first.to_dict()["ref"] == "DE@1"


def test_low_precision_prompt_is_stored_as_float32(tmp_path):
    reg = Registry(tmp_path)
    prompt = _prompt().to(torch.bfloat16)
    reg.save("FR", prompt, base_model="tiny", base_fingerprint=FP, provenance={})
    loaded = reg.load("FR")
    assert torch.equal(loaded.prompt, prompt.float()) and loaded.info.loss is None


def test_peft_config_matches_what_peft_writes(tmp_path):
    peft = pytest.importorskip("peft")
    info = Registry(tmp_path).save("DE", _prompt(), base_model="tiny", base_fingerprint=FP, provenance={},
                                   num_layers=2, num_attention_heads=4)
    written = json.loads((info.path / "adapter_config.json").read_text())
    expected = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=HIDDEN,
                                       num_transformer_submodules=1, num_attention_heads=4, num_layers=2,
                                       base_model_name_or_path="tiny", inference_mode=True)
    expected = json.loads(json.dumps(expected.to_dict(), default=str))
    expected["peft_type"], expected["task_type"] = "PROMPT_TUNING", "CAUSAL_LM"
    assert set(written) == set(expected)
    assert {k: v for k, v in written.items() if k != "peft_version"} == \
           {k: v for k, v in expected.items() if k != "peft_version"}


def test_peft_loads_the_adapter_and_agrees_with_runtime(tmp_path, tiny_model):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from culign.model import Runtime

    model, tok = tiny_model
    model.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    prompt = _prompt(seed=7) * base.get_input_embeddings().weight.std()
    info = Registry(tmp_path / "adapters").save("DE", prompt, base_model=str(tmp_path / "base"),
                                                base_fingerprint=FP, provenance={})
    ids = tok("how are you?", add_special_tokens=False)["input_ids"]
    expected = Runtime(base, tok, "tiny", "cpu", torch.float32).next_token_logits([(ids, prompt)])[0]

    peft_model = peft.PeftModel.from_pretrained(base, str(info.path)).eval()
    torch.testing.assert_close(peft_model.prompt_encoder["default"].embedding.weight.detach(), prompt,
                               rtol=0, atol=0)
    with torch.inference_mode():
        input_ids = torch.tensor([ids])
        out = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    torch.testing.assert_close(out.logits[0, -1].float(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ damage
def test_corrupt_weights_raise_and_the_registry_stays_usable(tmp_path):
    reg = Registry(tmp_path)
    for seed in range(4):
        _save(reg, seed=seed)
    flipped, truncated, bad_json = (tmp_path / "DE" / str(v) for v in (2, 3, 4))
    _flip_byte(flipped / "adapter_model.safetensors")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    (bad_json / "culign.json").write_text('{"region": "DE", ')

    with pytest.raises(AdapterCorrupt, match=r"DE@2.*sha256"):
        reg.load("DE", 2)
    assert any("sha256" in p for p in reg.verify("DE", 2))
    with pytest.raises(AdapterCorrupt, match=r"DE@3.*truncated"):
        reg.load("DE", 3)
    with pytest.raises(AdapterCorrupt, match=r"DE@4.*culign.json"):
        reg.load("DE", 4)

    infos, warnings = reg.scan()  # cheap: the flipped byte only shows when hashing, in load/verify
    assert [i.version for i in infos] == [1, 2]
    assert len(warnings) == 2 and "truncated" in warnings[0] and "culign.json" in warnings[1]
    assert str(truncated) in warnings[0]
    assert torch.equal(reg.load("DE", 1).prompt, _prompt(seed=0)) and reg.verify("DE", 1) == []
    assert reg.resolve("DE").version == 2  # latest readable version; 3 and 4 are skipped
    assert reg.versions("DE") == [1, 2]


def test_truncated_to_nothing_and_missing_tensor_are_corrupt(tmp_path):
    from safetensors.torch import save as save_safetensors

    reg = Registry(tmp_path)
    empty, renamed = _save(reg, seed=0).path, _save(reg, seed=1).path
    (empty / "adapter_model.safetensors").write_bytes(b"")
    data = save_safetensors({"other": _prompt()})  # valid file, wrong key, correct hash
    (renamed / "adapter_model.safetensors").write_bytes(data)
    prov = json.loads((renamed / "culign.json").read_text())
    prov["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (renamed / "culign.json").write_text(json.dumps(prov))
    for version in (1, 2):
        with pytest.raises(AdapterCorrupt):
            reg.load("DE", version)
    assert reg.scan()[0] == [] and len(reg.scan()[1]) == 2


def test_incompatible_hidden_size_and_base_model(tmp_path, caplog):
    reg = Registry(tmp_path)
    _save(reg)
    with pytest.raises(AdapterIncompatible, match=r"DE@1.*hidden size 32"):
        reg.load("DE", hidden_size=32, allow_base_mismatch=True)  # never overridable
    with pytest.raises(AdapterIncompatible, match=r"DE@1.*sha256:other"):
        reg.load("DE", hidden_size=HIDDEN, base_fingerprint="sha256:other")
    assert len(reg.verify("DE", hidden_size=32, base_fingerprint="sha256:other")) == 2
    with caplog.at_level(logging.WARNING, logger="culign.registry"):
        loaded = reg.load("DE", hidden_size=HIDDEN, base_fingerprint="sha256:other", allow_base_mismatch=True)
    assert torch.equal(loaded.prompt, _prompt()) and "allow_base_mismatch" in caplog.text
    assert reg.verify("DE", base_fingerprint="sha256:other", allow_base_mismatch=True) == []


# ------------------------------------------------------------------------------------------------ crashes and races
_SAVE_SCRIPT = """
import sys, torch
from culign.registry import Registry
info = Registry(sys.argv[1]).save("DE", torch.full((200, 64), 0.25), base_model="tiny",
                                  base_fingerprint="sha256:base", provenance={"writer": "child"})
print(info.ref, flush=True)
"""


def _start_paused_save(root: Path, pause_s: float) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: str(pause_s), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _SAVE_SCRIPT, str(root)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_finished_temp_dir(root: Path, proc: subprocess.Popen, timeout_s: float = 120) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = list(root.glob("DE/.tmp-*/culign.json"))
        if done:
            return done[0].parent
        if proc.poll() is not None:
            pytest.fail(f"save subprocess exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("save subprocess never reached the rename")


def test_save_killed_before_rename_leaves_no_version(tmp_path):
    reg = Registry(tmp_path)
    proc = _start_paused_save(tmp_path, 60)
    tmp = _wait_for_finished_temp_dir(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert tmp.exists() and reg.scan() == ([], []) and reg.regions() == []
    with pytest.raises(AdapterNotFound):
        reg.resolve("DE")
    info = _save(reg)
    assert info.version == 1 and torch.equal(reg.load("DE").prompt, _prompt())
    assert tmp.exists()  # too young to be called stale: its writer might still be running

    old = time.time() - STALE_AFTER_S - 60
    os.utime(tmp, (old, old))
    assert _save(reg, seed=1).version == 2 and not tmp.exists()


def test_concurrent_writer_takes_the_next_version(tmp_path):
    reg = Registry(tmp_path)
    proc = _start_paused_save(tmp_path, 4)  # the child looks at the versions (none: it will try 1), then sleeps
    _wait_for_finished_temp_dir(tmp_path, proc)
    assert _save(reg).version == 1  # we take 1 while the child sleeps
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "DE@2"
    child = reg.load("DE", 2)
    assert child.provenance["writer"] == "child" and child.provenance["version"] == 2
    assert torch.equal(child.prompt, torch.full((200, 64), 0.25))
    assert torch.equal(reg.load("DE", 1).prompt, _prompt()) and reg.verify("DE", 2) == []


def test_stray_file_with_a_version_name_is_skipped(tmp_path):
    (tmp_path / "DE").mkdir()
    (tmp_path / "DE" / "1").write_text("not an adapter")
    reg = Registry(tmp_path)
    assert reg.scan() == ([], [])
    assert _save(reg).ref == "DE@2" and (tmp_path / "DE" / "1").read_text() == "not an adapter"


# ------------------------------------------------------------------------------------------------ names and paths
@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "x\n", ".", "..", "DE@1", None])
def test_invalid_region_names_are_rejected(tmp_path, name):
    reg = Registry(tmp_path / "root")
    with pytest.raises(ValueError):
        reg.save(name, _prompt(), base_model="tiny", base_fingerprint=FP, provenance={})
    for call in (reg.resolve, reg.load, reg.versions, reg.remove, reg.verify):
        with pytest.raises(ValueError):
            call(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere, not even the root


def test_invalid_inputs_write_nothing(tmp_path):
    reg = Registry(tmp_path / "root")
    for bad in (torch.zeros(64), torch.zeros(0, 64), torch.full((2, 64), float("nan")), torch.zeros(2, 64).long()):
        with pytest.raises(ValueError):
            reg.save("DE", bad, base_model="tiny", base_fingerprint=FP, provenance={})
    for name in ("../evil", "culign.json", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            reg.save("DE", _prompt(), base_model="tiny", base_fingerprint=FP, provenance={}, files={name: b""})
    with pytest.raises(ValueError):  # NaN is not JSON
        reg.save("DE", _prompt(), base_model="tiny", base_fingerprint=FP, provenance={"loss": float("nan")})
    with pytest.raises(ValueError):
        reg.resolve("DE", 0)
    assert not (tmp_path / "root").exists()


def test_symlink_out_of_the_root_is_refused(tmp_path):
    outside = Registry(tmp_path / "outside")
    _save(outside, region="EVIL")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "EVIL").symlink_to(tmp_path / "outside" / "EVIL")
    reg = Registry(tmp_path / "root")
    with pytest.raises(RegistryError, match="outside the registry root"):
        reg.load("EVIL")
    infos, warnings = reg.scan()
    assert infos == [] and "outside the registry root" in warnings[0]


def test_region_lookup_is_case_insensitive(tmp_path):
    reg = Registry(tmp_path)
    _save(reg, region="DE")
    assert _save(reg, region="de", seed=1).ref == "DE@2"  # same folder, not a second region
    assert reg.resolve("de").ref == "DE@2" and reg.regions() == ["DE"]
    assert torch.equal(reg.load("dE", 1).prompt, _prompt())


def test_missing_root_and_unknown_region(tmp_path):
    reg = Registry(tmp_path / "nowhere")
    assert reg.scan() == ([], []) and reg.regions() == []
    _save(Registry(tmp_path / "root"), region="FR")
    reg = Registry(tmp_path / "root")
    with pytest.raises(AdapterNotFound, match="available regions: FR") as e:
        reg.load("DE")
    assert e.value.available == ["FR"]
    with pytest.raises(AdapterNotFound, match="FR@9"):
        reg.resolve("FR", 9)
    (tmp_path / "root" / "FR" / "notes").mkdir()  # non-integer names and dot-dirs are ignored silently
    (tmp_path / "root" / "FR" / ".tmp-x").mkdir()
    assert reg.scan()[1] == []


# ------------------------------------------------------------------------------------------------ remove
def test_remove_one_version_then_all(tmp_path):
    reg = Registry(tmp_path)
    for seed in range(3):
        _save(reg, seed=seed)
    _save(reg, region="FR")
    removed = reg.remove("DE", 3)
    assert [i.ref for i in removed] == ["DE@3"] and reg.versions("DE") == [1, 2]
    assert reg.resolve("DE").version == 2
    with pytest.raises(AdapterNotFound):
        reg.remove("DE", 3)
    assert _save(reg, seed=9).ref == "DE@4"
    reg.remove("DE", 4)

    (tmp_path / "DE" / "2" / "culign.json").write_text("not json")  # unreadable versions are removed too
    removed = reg.remove("DE")
    assert [i.ref for i in removed] == ["DE@1", "DE@2"] and removed[0].base_fingerprint == FP
    assert reg.regions() == ["FR"] and reg.scan()[1] == []
    assert [p.name for p in (tmp_path / "DE").iterdir()] == [".last-version"]  # no trash left behind
    with pytest.raises(AdapterNotFound):
        reg.remove("DE")
    # Numbers are never reused: a server that cached DE@4 must not be handed different content under that name.
    assert _save(reg).ref == "DE@5"
