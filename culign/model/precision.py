"""Search precisions: the frozen model as the search scores its candidates, made from the float32 runtime.

DE only compares candidates, so the search may score them in a faster precision as long as their ranking holds
(:mod:`culign.fidelity` measures that); baselines, the final re-scoring and every reported number stay on the
float32 runtime. A copy shares with the float32 model every tensor it does not convert (embeddings, the final norm,
the head, buffers), so a 1.5B model costs 6.2 GB (float32) + 2.6 GB (bf16 trunk) or + 1.3 GB (int8 trunk).

- ``fp32``: the runtime itself (the reference).
- ``bf16``: the decoder layers' weights in bfloat16; embeddings, final norm and head stay float32 and the answer
  position is computed in float32 (as :class:`Runtime` does for any bf16 model). Fast only where the CPU multiplies
  bf16 natively (AMX, AVX512-BF16) or on a GPU: oneDNN emulates it elsewhere, ~65x slower than float32.
- ``int8``: the decoder layers' ``nn.Linear`` as :class:`Int8Linear` (dynamic int8: weights per output channel,
  activations per token, ``torch._int_mm``; oneDNN uses VNNI or AMX-INT8 where the CPU has them); the head stays
  float32. Not torch.ao's ``quantize_dynamic`` (deprecated, though still in torch 2.13): its one activation scale per
  call loses the ranking (see :class:`Int8Linear`). torchao (not a dependency) ran its int8 at 117 GFLOP/s against
  102 in float32 on a 1536 x 8960 linear here, where ``torch._int_mm`` ran 250 against 96 (AMX Xeon, loaded).

Which one a run uses is not decided here: the rates and the fidelity check decide (:func:`linear_rate`,
:mod:`culign.fidelity`). A precision is a :class:`Precision` in :data:`PRECISIONS`; tests register broken ones.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .runtime import Runtime

REFERENCE = "fp32"


@dataclass(frozen=True)
class Precision:
    name: str
    convert: Callable[[torch.nn.Module], torch.nn.Module]  # float32 model -> a copy sharing what it leaves alone
    dtype: torch.dtype  # of the copy's activations (Runtime.dtype)
    unavailable: Callable[[torch.device], str | None] = lambda device: None  # why not on this device, or None


def _kept(model: torch.nn.Module) -> set[int]:
    """ids of the parameters a copy keeps float32: input embeddings, the final norm and the output head (the answer
    is read there, and a tied head is the embedding matrix: sharing it costs nothing)."""
    modules = []
    if hasattr(model, "get_input_embeddings"):
        modules += [model.get_input_embeddings(), model.get_output_embeddings()]
        modules += [getattr(model.base_model, n, None) for n in ("norm", "final_layernorm", "ln_f")]
    return {id(p) for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()}


def _shared_copy(model: torch.nn.Module, convert: Callable[[torch.nn.Parameter], torch.nn.Parameter] | None = None
                 ) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original's tensors, except the parameters
    outside :func:`_kept` when ``convert`` is given (those become ``convert(p)``; a tied parameter stays tied)."""
    kept = _kept(model)
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = p if convert is None or id(p) in kept else convert(p)
    for b in model.buffers():  # rotary frequencies etc.: float32 as loaded, shared
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def _to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    return _shared_copy(model, lambda p: torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))


class Int8Linear(torch.nn.Module):
    """``nn.Linear`` as an int8 x int8 matmul (``torch._int_mm``, int32 accumulation): weights quantised once per
    output channel, activations per row (token) on every call, both symmetric.

    Per row, not per tensor: these models' normed activations carry channels 100x the others, and one scale for a
    whole batch (torch.ao's ``quantize_dynamic``, 7-bit on x86) moved SmolLM2's option log-probabilities by up to 2.1
    and its expected answers by up to 2.5 points (measured); per row the error is several times smaller.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", (w / scale[:, None]).round().to(torch.int8).t())  # [in, out], column-major
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias  # float32, shared with the float32 model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        y = torch._int_mm((rows / scale).round_().to(torch.int8), self.weight_t).float()
        y = y.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _to_int8(model: torch.nn.Module) -> torch.nn.Module:
    out = _shared_copy(model)  # every float32 tensor shared; the copy's trunk Linear modules are then swapped
    head = out.get_output_embeddings() if hasattr(out, "get_output_embeddings") else None
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(parent, name, Int8Linear(child))
    return out


def _int8_unavailable(device: torch.device) -> str | None:
    try:  # an int8 matmul kernel for this device and torch build, tried once on the smallest useful shape
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8, device=device),
                      torch.ones(32, 32, dtype=torch.int8, device=device))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"no int8 matmul (torch._int_mm) on {device.type} in torch {torch.__version__}: {e}"
    return None


PRECISIONS: dict[str, Precision] = {
    REFERENCE: Precision(REFERENCE, lambda m: m, torch.float32),
    "bf16": Precision("bf16", _to_bf16, torch.bfloat16),
    "int8": Precision("int8", _to_int8, torch.float32, _int8_unavailable),
}


def get(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown search precision {name!r}; choose from auto, {', '.join(PRECISIONS)}") from None


def unavailable(name: str, rt: Runtime) -> str | None:
    """Why ``name`` cannot make a search copy of ``rt`` here (None: it can)."""
    if name == REFERENCE:
        return None
    if rt.dtype != torch.float32:
        return f"the runtime is {str(rt.dtype).replace('torch.', '')}, not float32 (a search copy is made from float32)"
    return get(name).unavailable(rt.device)


def search_runtime(rt: Runtime, name: str) -> Runtime:
    """The runtime the search scores on in precision ``name``: ``rt`` itself for fp32, else a copy sharing ``rt``'s
    unconverted tensors. Its fingerprint is ``rt``'s plus the precision, so no cache keyed on it (the bare model's
    answers, validity) mixes the copy's numbers with float32 ones."""
    if name == REFERENCE:
        return rt
    why = unavailable(name, rt)
    if why:
        raise ValueError(f"search precision {name}: {why}")
    p = get(name)
    # scoring only: no row-wise decode attention (batch invariance is for generation); the answer position float32
    out = Runtime(p.convert(rt.model), rt.tokenizer, rt.name, str(rt.device), p.dtype, batch_invariant=False)
    out._fingerprint = f"{rt.fingerprint}/{name}"
    return out


def linear_rate(name: str, m: int, k: int, n: int, device: str = "cpu", repeat: int = 3) -> float:
    """GFLOP/s of one ``k -> n`` linear layer on ``m`` rows in precision ``name``, through the same conversion the
    search copy gets (bf16 weights, or :class:`Int8Linear` with its per-row activation quantisation): the fastest of
    ``repeat`` calls, so that a neighbour's burst on a shared CPU does not decide."""
    lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(device).eval().requires_grad_(False)
    mod = get(name).convert(lin)
    x = torch.randn(m, k, device=device, dtype=get(name).dtype)
    best = float("inf")
    with torch.inference_mode():
        mod(x)  # first call: oneDNN builds its kernels for the shape
        for _ in range(repeat):
            t0 = time.perf_counter()
            mod(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9
