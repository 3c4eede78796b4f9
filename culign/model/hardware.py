"""The machine the model runs on: the CPU's ISA flags (read once), whether it multiplies bf16 natively, and the
device and dtype that follow from them."""
from __future__ import annotations

import functools
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags from /proc/cpuinfo (empty off Linux, or where the kernel lists no ``flags`` line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (what benchmarks print beside the ISA level), else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16), read from its ISA flags.

    Where it does not (AVX2-only machines, e.g. some AMD EPYC kinds here), oneDNN emulates bf16 and a matmul runs
    ~65x slower than in fp32 (1.3 vs 85 GFLOP/s measured); where it does, bf16 is 2.5-4x faster than fp32
    (AVX512-BF16: 388 vs 158 GFLOP/s; AMX: ~730 vs 172). Off Linux the flags cannot be read: a 0.1 s probe decides.
    """
    flags = cpu_flags()
    if not flags:
        return _bf16_probe()
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _bf16_probe() -> bool:
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(256, 256, dtype=dtype), torch.ones(256, 256, dtype=dtype)
        a @ b  # first call builds the kernel
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        rates[dtype] = time.perf_counter() - t0
    return rates[torch.bfloat16] < rates[torch.float32]


def cpu_capability() -> str:
    """What every benchmark prints beside its figures: torch's vector ISA level and whether bf16 is native."""
    return (f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if cpu_bf16_native() else 'emulated'}, "
            f"{torch.get_num_threads()} threads")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str, scoring: bool = False) -> torch.dtype:
    """float32 for survey scoring on every device; for generation, bf16 where it is fast.

    Scoring reads small differences between option-token probabilities. In bf16 the rounding of a forward pass moves an
    expected answer by ~0.03 (1-3 index points) for a perturbation of the prompt as small as 1e-3 of its range,
    and by as much again for another batch size: as large as a soft prompt's real effect, so DE would select rounding
    luck (measured on SmolLM2: bf16 DE stalled at its initial population; fp32 moves 0.0001 for that perturbation).
    Generation is not that sensitive: bf16 on GPUs, and on CPUs whose ISA multiplies bf16 natively; fp32 on the
    others, where emulated bf16 only loses (prefill of 64 tokens 1,181 ms in bf16 vs 280 ms in fp32 on AVX2).
    """
    if scoring:
        return torch.float32
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        return torch.bfloat16 if cpu_bf16_native() else torch.float32
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str, scoring: bool = False) -> torch.dtype:
    """A dtype by name (``auto`` or None: :func:`default_dtype`)."""
    if name is None or name == "auto":
        return default_dtype(device, scoring)
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(set(DTYPES)))}") from None
