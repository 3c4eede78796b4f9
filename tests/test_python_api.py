"""The public Python API (culign.api, re-exported by culign): its contract (names, signatures, result fields, named
exceptions, never SystemExit) and every example in docs/python.md, run in order in one namespace."""
from __future__ import annotations

import inspect
import os
import re

import pytest

import culign
from culign import api
from reliability.harness import REPO


def test_the_api_is_exported_and_documented():
    for name in api.__all__:
        assert getattr(culign, name) is getattr(api, name)
    assert set(api.__all__) <= set(dir(culign))
    doc = (REPO / "docs" / "python.md").read_text()
    for fn in ("load_model", "evaluate", "train", "train_regions", "open_registry"):
        assert f"culign.{fn}" in doc


def test_signatures_are_keyword_only_where_they_should_be():
    for fn in (api.evaluate, api.train, api.train_regions):
        params = inspect.signature(fn).parameters
        first, *rest = params.values()
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # the target
        assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in rest), fn
    assert "progress" in inspect.signature(api.train).parameters
    assert inspect.signature(api.train).parameters["progress"].default is False  # off in the API


def test_errors_are_named_exceptions_not_system_exit(tmp_path, tiny_runtime):
    with pytest.raises(culign.UnknownRegionError):
        culign.region("Narnia")
    with pytest.raises(ValueError):
        culign.custom_target("PDI=eighty")
    with pytest.raises(culign.AdapterNotFound):
        culign.load_adapter("US@7", tiny_runtime, registry=tmp_path)
    with pytest.raises(culign.ModelLoadError):
        culign.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="not both"):
        culign.evaluate("US", model=tiny_runtime, presentations=["vsm/chat/asc"], split=culign.Split(("x",)))


def test_results_have_to_dict_and_to_pandas(word_runtime):
    result = culign.evaluate("US", model=word_runtime, persona=True, presentations=["vsm/chat/asc"])
    d = result.to_dict()
    assert set(d["rows"]) == {"naive", "persona"} and d["model"] == word_runtime.name
    assert [r.label for r in result.rows] == ["naive", "persona"] and result.row("naive").train_loss > 0
    label = culign.evaluate("US", model=word_runtime, presentations=["vsm/label_chat/asc"], readout="label")
    assert label.rows[0].train_loss > 0
    with pytest.raises(ValueError, match="read-out"):
        culign.evaluate("US", model=word_runtime, presentations=["vsm/chat/asc"], readout="label")
    pd = pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame["row"]) == ["naive", "persona"]
    assert {"PDI", "IVR", "loss", "option_mass", "presentation"} <= set(frame.columns)


def _examples() -> list[str]:
    text = (REPO / "docs" / "python.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.real
def test_every_example_in_docs_python_md_runs(tmp_path, monkeypatch):
    blocks = _examples()
    assert len(blocks) >= 4
    (tmp_path / "adapters").symlink_to(REPO / "adapters")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), namespace)  # noqa: S102  our own documentation
    assert (tmp_path / "my-adapters" / "US" / "1" / "adapter_model.safetensors").exists()
    assert os.getcwd() == str(tmp_path)


def test_splits_and_read_outs_are_chosen_as_the_cli_chooses_them(word_runtime):
    digit = culign.make_split()
    assert len(digit.train) == 9 and digit.leaks() == []
    assert all("label_" not in n for n in digit.all_names)
    label = culign.make_split("label")
    assert all(n.split("/")[1].startswith("label_") for n in label.all_names)
    inferred = culign.make_split(train=["vsm/label_chat/asc"])  # the read-out the named presentations are written for
    assert inferred.train == ("vsm/label_chat/asc",) and all("label_" in n for n in inferred.all_names)
    assert culign.make_split("digit", validation=[]).validation == {}
    with pytest.raises(ValueError, match="not both"):
        culign.make_split(presentations=["vsm/chat/asc"], train=["vsm/chat/asc"])
    result = culign.evaluate("US", model=word_runtime, presentations=["vsm/label_chat/asc"])
    assert result.readout == "label" and result.to_dict()["readout"] == "label"
    with pytest.raises(ValueError, match="not both"):
        culign.train("US", model=word_runtime, search=culign.optimize.SearchConfig(), budget=16)


def test_the_service_starts_without_the_training_stack():
    """`from culign import http_limits` (service.py) must not load culign.api through the package's lazy re-export:
    the serving image has no scipy or Ray (bentofile.yaml), and a service that imported them would not start."""
    import subprocess
    import sys

    probe = ("import sys, service; loaded = [m for m in ('culign.api', 'culign.trainer', 'scipy', 'ray') "
             "if m in sys.modules]; print(loaded); sys.exit(1 if loaded else 0)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
