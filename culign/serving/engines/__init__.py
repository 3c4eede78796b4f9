"""The inference engines behind one seam (:mod:`.base`): culign's own scheduler (:mod:`.scheduler`) and vLLM
(:mod:`.vllm`). :func:`build_engine` is the one place either is built; nothing else imports a backend. The
service's engine is supervised (:mod:`.supervisor`): restarted in-process when it dies."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .base import Engine, Invariance, Job, QueueFull, RowFailed, ShuttingDown, Stats, Token
from .supervisor import EngineRestarting, Supervisor

if TYPE_CHECKING:
    from ...model.runtime import Runtime
    from ..settings import ServiceSettings

__all__ = ["Engine", "EngineRestarting", "Invariance", "Job", "QueueFull", "RowFailed", "ShuttingDown", "Stats",
           "Supervisor", "Token", "build_engine", "load_runtime", "supervised_engine"]


def load_runtime(settings: "ServiceSettings") -> "Runtime":
    """The model the service holds, loaded once. For culign's engine it is the one that decodes (on the settings'
    device and dtype); for vLLM it stays on the CPU in the checkpoint's dtype: it turns token ids into embeddings
    (upcast to float32) for vLLM and fingerprints the weights that adapters are checked against, while vLLM holds
    the copy that decodes.

    Loaded on one thread: torch's OpenMP (libgomp) throttles its spin-waiting once more OpenMP threads exist than
    cores. A loading thread that kept a team of its own would push the decode worker's team over that line, and a
    decode step is thousands of tiny parallel regions: on 2 cores every token took 1.5x as long in the worker thread
    as in the main one (measured). Loading single-threaded leaves the worker's team the only one.
    """
    from ...model.runtime import Runtime

    torch.set_num_threads(1)
    if settings.engine == "vllm":
        from ...model.loading import stored_dtype

        # in the checkpoint's own dtype: embedding rows upcast exactly, and the fingerprint is dtype-independent;
        # a float32 copy of bf16 weights would double this worker's memory beside vLLM's own copy (1.5B: 6.2 GB)
        runtime = Runtime.load(settings.model, device="cpu", dtype=stored_dtype(settings.model))
    else:
        runtime = Runtime.load(settings.model, device=settings.device, dtype=settings.dtype,
                               batch_invariant=settings.batch_invariant)
    # one context limit for both engines: what requests are checked against and what vLLM sizes its KV cache for
    runtime.max_context = min(runtime.max_context, settings.max_context)
    return runtime


def build_engine(settings: "ServiceSettings", runtime: "Runtime") -> Engine:
    """The engine ``settings.engine`` names, over ``runtime`` (from :func:`load_runtime`): culign's continuous
    scheduler (or the static batcher, for CULIGN_SCHEDULER=static and for models whose cache cannot grow row by row:
    sliding-window layers), or vLLM."""
    if settings.engine == "vllm":
        from ...model.hardware import default_device
        from ...model.loading import model_source
        from .reaper import start_reaper
        from .vllm import VllmEngine, vllm_dtype

        start_reaper()  # before vLLM starts its engine process: none may outlive this worker

        device = settings.device or default_device()
        return VllmEngine(runtime, model_source(settings.model)[0], max_rows=settings.max_rows,
                          max_queue=settings.max_queue, grace=settings.shutdown_grace_s,
                          dtype=vllm_dtype(settings.dtype, device), enforce_eager=settings.vllm_eager,
                          kv_cache_gib=settings.vllm_kv_gib, device=device,
                          tensor_parallel_size=settings.vllm_tensor_parallel)
    from ...model.decoding import decodes_incrementally
    from .scheduler import Scheduler, StaticBatcher

    if settings.scheduler == "continuous" and decodes_incrementally(runtime):
        return Scheduler(runtime, settings.max_rows, settings.max_queue, grace=settings.shutdown_grace_s)
    return StaticBatcher(runtime, settings.max_rows, settings.max_queue, grace=settings.shutdown_grace_s,
                         window=settings.batch_window_ms / 1000)


def supervised_engine(settings: "ServiceSettings", runtime: "Runtime",
                      on_give_up: Callable[[str], None] | None = None) -> Supervisor:
    """The service's engine: :func:`build_engine`'s, restarted over the same ``runtime`` when it dies, up to
    ``settings.engine_restart_attempts`` failed starts in a row (then ``on_give_up``)."""
    return Supervisor(lambda: build_engine(settings, runtime), max_failures=settings.engine_restart_attempts,
                      on_give_up=on_give_up)
