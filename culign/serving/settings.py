"""The service's settings: read from the environment once, checked, frozen, and passed down.

Every knob of ``service.py`` is here with its default; a bad value stops startup with an error naming the
variable (a typo should not turn into a silent default). docs/deploy.md lists them. The model, the registry, the
device and the dtype are resolved by :func:`culign.defaults.resolve`, as for the CLI and the Python API.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from .. import defaults

__all__ = ["ServiceSettings", "SettingsError", "default_engine"]
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SCHEDULERS = ("continuous", "static")
_ENGINES = ("culign", "vllm")


def default_engine() -> str:
    """What CULIGN_ENGINE=auto (the default) serves with: vLLM where the culign[vllm] extra is installed, culign's own
    engine elsewhere. Measured side by side (docs/deploy.md, *Benchmark*), vLLM in float32 decoded 1.16-1.33x the
    tokens/s of culign's engine at the same batch invariance; culign's engine starts in seconds, not tens of them."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "culign"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class ServiceSettings:
    adapters: Path | str  # CULIGN_ADAPTERS: the registry, a folder or s3://BUCKET/PREFIX (default: adapters/ beside
    # service.py)
    model: str | None = None  # CULIGN_MODEL: HF id or local folder (default: the embedded SmolLM2)
    device: str | None = None  # CULIGN_DEVICE (default: cuda if available, else cpu)
    dtype: str | None = None  # CULIGN_DTYPE: auto, bf16, fp16, fp32 (auto: bf16 where the hardware is fast at it)
    max_tokens: int = 512  # CULIGN_MAX_TOKENS: the largest max_tokens a request may ask for
    max_context: int = 8192  # CULIGN_MAX_CONTEXT: the most tokens (prompt, soft prompt, answer) one request may hold,
    # at most the model's own limit. Bounded because vLLM reserves KV room for one request of this length at start:
    # Qwen2.5's own 32,768 needs 1.75 GiB in float32, more than the default CULIGN_VLLM_KV_GIB
    default_max_tokens: int = 128  # CULIGN_DEFAULT_MAX_TOKENS: when a request gives none
    rescan_seconds: float = 5.0  # CULIGN_RESCAN_SECONDS: how often the registry is listed again
    scheduler: str = "continuous"  # CULIGN_SCHEDULER: continuous (rows join every step) or static (the old design)
    max_rows: int = 16  # CULIGN_MAX_ROWS (old name CULIGN_MAX_BATCH): rows decoded together
    max_queue: int = 64  # CULIGN_MAX_QUEUE: requests waiting for a row; past it, 429 with Retry-After
    batch_window_ms: float = 5.0  # CULIGN_BATCH_WINDOW_MS: the static scheduler's gathering window
    shutdown_grace_s: float = 2.0  # CULIGN_SHUTDOWN_GRACE_S: what running rows get to finish on SIGTERM
    max_body_bytes: int = 1 << 20  # CULIGN_MAX_BODY_BYTES: larger request bodies get 413
    max_header_bytes: int = 8192  # CULIGN_MAX_HEADER_BYTES: a larger header value gets 431
    max_header_block_bytes: int = 64 * 1024  # CULIGN_MAX_HEADER_BLOCK_BYTES: all headers together; more gets 431
    log_level: str = "INFO"  # CULIGN_LOG_LEVEL
    batch_invariant: bool | None = None  # CULIGN_BATCH_INVARIANT: auto (bf16/fp16 only), 1 or 0 (see docs/deploy.md)
    engine: str = "culign"  # CULIGN_ENGINE: culign (its own scheduler), vllm (the culign[vllm] extra) or auto (the
    # default: vllm where it is installed, else culign); from_env resolves auto, so this field never holds it
    vllm_kv_gib: float = 1.0  # CULIGN_VLLM_KV_GIB: vLLM's KV cache on CPU (VLLM_CPU_KVCACHE_SPACE, if that is unset)
    vllm_eager: bool = True  # CULIGN_VLLM_EAGER: 1 (no torch.compile: loads in ~20 s) or 0 (compiled: faster, ~100 s)
    vllm_tensor_parallel: int = 1  # CULIGN_VLLM_TENSOR_PARALLEL: GPUs one vLLM engine shards the model over
    api_keys_poll_s: float = 1.0  # CULIGN_API_KEYS_POLL_S: how often the keys file is checked for a change
    key_share: float = 0.5  # CULIGN_KEY_SHARE: with API keys, the most of the engine's places (rows + queue) one
    # key may hold at once; past it that key gets 429 while the others are still admitted
    engine_restart_attempts: int = 3  # CULIGN_ENGINE_RESTART_ATTEMPTS: failed restarts in a row of a dead engine
    # before the worker exits non-zero (for its supervisor to restart it)
    api_keys: Path | None = None  # CULIGN_API_KEYS: a file of sha256-hashed keys (culign/serving/auth.py); unset: no auth

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, default_adapters: Path | None = None) -> "ServiceSettings":
        env = os.environ if env is None else env

        def get(name: str, *old: str) -> str | None:
            for key in (name, *old):
                value = env.get(key)
                if value not in (None, ""):
                    return value.strip()
            return None

        def number(name: str, kind: type, default, low, *old: str):
            raw = get(name, *old)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
            if value < low:
                raise SettingsError(f"{name}={raw!r} must be >= {low}")
            return value

        d = {f.name: f.default for f in fields(cls) if f.name != "adapters"}
        level = (get("CULIGN_LOG_LEVEL") or d["log_level"]).upper()
        if level not in _LOG_LEVELS:
            raise SettingsError(f"CULIGN_LOG_LEVEL={level!r}: choose from {', '.join(_LOG_LEVELS)}")
        scheduler = (get("CULIGN_SCHEDULER") or d["scheduler"]).lower()
        if scheduler not in _SCHEDULERS:
            raise SettingsError(f"CULIGN_SCHEDULER={scheduler!r}: choose from {', '.join(_SCHEDULERS)}")
        invariant_raw = (get("CULIGN_BATCH_INVARIANT") or "auto").lower()
        invariant = {"auto": None, "1": True, "true": True, "yes": True, "0": False, "false": False,
                     "no": False}.get(invariant_raw, "bad")
        if invariant == "bad":
            raise SettingsError(f"CULIGN_BATCH_INVARIANT={invariant_raw!r}: choose auto, 1 or 0")
        engine = (get("CULIGN_ENGINE") or "auto").lower()
        if engine not in (*_ENGINES, "auto"):
            raise SettingsError(f"CULIGN_ENGINE={engine!r}: choose from {', '.join(_ENGINES)} or auto")
        engine = default_engine() if engine == "auto" else engine
        eager_raw = (get("CULIGN_VLLM_EAGER") or "1").lower()
        eager = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(eager_raw)
        if eager is None:
            raise SettingsError(f"CULIGN_VLLM_EAGER={eager_raw!r}: choose 1 or 0")
        keys = get("CULIGN_API_KEYS")
        if get("CULIGN_ADAPTERS") is None and default_adapters is None:
            raise SettingsError("CULIGN_ADAPTERS is not set and no default registry was given")
        try:
            where = defaults.resolve(env=env, registry_fallback=default_adapters or "")
        except ValueError as e:
            raise SettingsError(str(e)) from None
        s = cls(adapters=where.registry, model=where.model, device=where.device, dtype=where.dtype,
                max_tokens=number("CULIGN_MAX_TOKENS", int, d["max_tokens"], 1),
                max_context=number("CULIGN_MAX_CONTEXT", int, d["max_context"], 64),
                default_max_tokens=number("CULIGN_DEFAULT_MAX_TOKENS", int, d["default_max_tokens"], 1),
                rescan_seconds=number("CULIGN_RESCAN_SECONDS", float, d["rescan_seconds"], 0.0),
                scheduler=scheduler,
                max_rows=number("CULIGN_MAX_ROWS", int, d["max_rows"], 1, "CULIGN_MAX_BATCH"),
                max_queue=number("CULIGN_MAX_QUEUE", int, d["max_queue"], 0),
                batch_window_ms=number("CULIGN_BATCH_WINDOW_MS", float, d["batch_window_ms"], 0.0),
                shutdown_grace_s=number("CULIGN_SHUTDOWN_GRACE_S", float, d["shutdown_grace_s"], 0.0),
                max_body_bytes=number("CULIGN_MAX_BODY_BYTES", int, d["max_body_bytes"], 1024),
                max_header_bytes=number("CULIGN_MAX_HEADER_BYTES", int, d["max_header_bytes"], 256),
                max_header_block_bytes=number("CULIGN_MAX_HEADER_BLOCK_BYTES", int, d["max_header_block_bytes"], 1024),
                log_level=level, batch_invariant=invariant, engine=engine,
                vllm_kv_gib=number("CULIGN_VLLM_KV_GIB", float, d["vllm_kv_gib"], 0.0625), vllm_eager=eager,
                vllm_tensor_parallel=number("CULIGN_VLLM_TENSOR_PARALLEL", int, d["vllm_tensor_parallel"], 1),
                api_keys_poll_s=number("CULIGN_API_KEYS_POLL_S", float, d["api_keys_poll_s"], 0.05),
                key_share=number("CULIGN_KEY_SHARE", float, d["key_share"], 0.0),
                engine_restart_attempts=number("CULIGN_ENGINE_RESTART_ATTEMPTS", int, d["engine_restart_attempts"], 1),
                api_keys=Path(keys) if keys else None)
        if s.default_max_tokens > s.max_tokens:
            if get("CULIGN_DEFAULT_MAX_TOKENS") is not None:
                raise SettingsError(f"CULIGN_DEFAULT_MAX_TOKENS ({s.default_max_tokens}) exceeds CULIGN_MAX_TOKENS "
                                    f"({s.max_tokens})")
            s = dataclasses.replace(s, default_max_tokens=s.max_tokens)  # a lower cap lowers the default with it
        if s.max_header_block_bytes < s.max_header_bytes:
            raise SettingsError(f"CULIGN_MAX_HEADER_BLOCK_BYTES ({s.max_header_block_bytes}) is below "
                                f"CULIGN_MAX_HEADER_BYTES ({s.max_header_bytes}): one header could never reach its cap")
        if not 0 < s.key_share <= 1:
            raise SettingsError(f"CULIGN_KEY_SHARE={s.key_share:g} must be in (0, 1]: the most of the queue one key "
                                "may hold")
        if s.vllm_tensor_parallel > 1 and s.engine != "vllm":
            raise SettingsError(f"CULIGN_VLLM_TENSOR_PARALLEL={s.vllm_tensor_parallel} needs CULIGN_ENGINE=vllm: "
                                "culign's own engine runs on one device")
        return s
