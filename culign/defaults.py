"""What culign uses when you do not say: the model, the adapter registry, the cache root, device and dtype.

This is the one place that reads culign's environment for them (``CULIGN_MODEL``, ``CULIGN_ADAPTERS``,
``CULIGN_CACHE`` / ``XDG_CACHE_HOME``, ``CULIGN_DEVICE``, ``CULIGN_DTYPE``, ``CULIGN_ANSWER_CACHE``,
``CULIGN_SCORE_BLOCK``, ``CULIGN_SEARCH_PRECISION``). The CLI, the Python API, the service's settings and the
fan-out all call :func:`resolve`, so `culign eval`, ``culign.evaluate()`` and the server pick the same model and
registry. What is given explicitly wins over the environment, which wins over the built-in default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# where `culign train` saves and `culign eval` / `adapters` look by default; the committed examples live in ./adapters
DEFAULT_REGISTRY = Path("runs") / "adapters"
_OFF = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Defaults:
    model: str | None  # an HF hub id or a local folder; None: the embedded SmolLM2-135M-Instruct
    registry: str | Path  # a folder, or an object-store URL such as s3://bucket/prefix
    cache: Path  # converted models, the answer and validity caches, checkpoints, the object-store download cache
    device: str | None  # None: cuda where available, else cpu (culign.model.hardware decides)
    dtype: str | None  # None: auto (float32 for scoring; bf16 for generation where the hardware is fast at it)
    answer_cache: bool = True  # the on-disk cache of the bare model's answers (CULIGN_ANSWER_CACHE=0: off)
    score_block: int | None = None  # candidates per scoring forward (CULIGN_SCORE_BLOCK; None: the model's default)
    search_precision: str = "auto"  # what training's search scores candidates in (culign.fidelity): auto, fp32, ...


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def registry_location(text: str | Path) -> str | Path:
    """A registry as written by a user: a URL stays a string, ``file://`` and plain paths become a Path."""
    text = str(text)
    if "://" in text and not text.startswith("file://"):
        return text
    return Path(text.removeprefix("file://"))


def resolve(*, model: str | None = None, registry: str | Path | None = None, device: str | None = None,
            dtype: str | None = None, search_precision: str | None = None,
            registry_fallback: str | Path = DEFAULT_REGISTRY, env: Mapping[str, str] | None = None) -> Defaults:
    """The settings a command runs with: each explicit argument, else its environment variable, else the default.

    ``registry_fallback``: the registry when neither is given (the CLI and API: ./runs/adapters; the service:
    adapters/ beside service.py).
    """
    env = os.environ if env is None else env
    cache = _get(env, "CULIGN_CACHE")
    if cache is None:
        cache = Path(_get(env, "XDG_CACHE_HOME") or Path.home() / ".cache") / "culign"
    block = _get(env, "CULIGN_SCORE_BLOCK")
    try:
        score_block = int(block) if block is not None else None
    except ValueError:
        raise ValueError(f"CULIGN_SCORE_BLOCK={block!r} is not an integer") from None
    if score_block is not None and score_block < 1:
        raise ValueError(f"CULIGN_SCORE_BLOCK={block!r} must be >= 1")
    return Defaults(
        model=model or _get(env, "CULIGN_MODEL"),
        registry=registry_location(registry or _get(env, "CULIGN_ADAPTERS") or registry_fallback),
        cache=Path(cache),
        device=device or _get(env, "CULIGN_DEVICE"),
        dtype=dtype or _get(env, "CULIGN_DTYPE"),
        answer_cache=(env.get("CULIGN_ANSWER_CACHE", "1").strip().lower() not in _OFF),
        score_block=score_block,
        search_precision=(search_precision or _get(env, "CULIGN_SEARCH_PRECISION") or "auto").lower())


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """culign's cache folder: $CULIGN_CACHE, else $XDG_CACHE_HOME/culign, else ~/.cache/culign."""
    return resolve(env=env).cache
