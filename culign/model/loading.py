"""Where a model comes from and how it is loaded: an embedded model (:mod:`.embedded`: SmolLM2 by default, converted
once from a wheel's GGUF into a cached safetensors folder), an HF hub id (from the local HF cache) or a local folder.

Reads no environment: ``model=None`` is the embedded model and ``device``/``dtype`` None pick for the hardware.
The user's defaults (CULIGN_MODEL, CULIGN_DEVICE, CULIGN_DTYPE) are resolved by :func:`culign.defaults.resolve`,
which the callers (CLI, API, service) call before loading.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .embedded import ModelLoadError, default_model, lookup, model_dir
from .hardware import DTYPES, default_device, parse_dtype

log = logging.getLogger("culign.model")

EMBEDDED_NAME = default_model().name  # "SmolLM2-135M-Instruct"
EMBEDDED_ID = default_model().id  # how the embedded default is named in provenance and /v1/models


def embedded_model_dir(model: str | None = None) -> Path:
    """An embedded model (default: SmolLM2) as a cached bf16 safetensors folder, converted on first use."""
    found = lookup(model)
    if found is None:
        raise ModelLoadError(f"{model!r} is not an embedded model")
    return model_dir(found)


def model_source(model: str | None = None) -> tuple[Path | str, str]:
    """(folder or hub id to load from, the name culign reports) for a model's name (None: the embedded default;
    "embedded:<name>": a catalogued embedded model, see :mod:`.embedded`)."""
    found = lookup(model)
    if found is not None:
        return model_dir(found), found.id
    return model, model


def stored_dtype(model: str | None = None) -> torch.dtype:
    """The dtype a model's checkpoint holds its weights in (its config's ``torch_dtype``; float32 when it does not
    say). Loading in it copies nothing and upcasting from it is exact: the embedded models are stored in bf16."""
    from transformers import AutoConfig

    path, _ = model_source(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {model!r}: {e}") from e
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


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
