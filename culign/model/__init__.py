"""The model layer: the one place that touches the model.

- :mod:`.hardware`: the CPU's flags, whether bf16 is native, the default device and dtype.
- :mod:`.loading`: where a model comes from (the embedded SmolLM2, an HF hub id, a folder) and loading it.
- :mod:`.runtime`: :class:`Runtime`, the loaded model: chat ids, soft-prompt injection, next-token logits.
- :mod:`.scoring`: the survey read-outs (option tokens, label continuations) on a shared-prefix KV cache.
- :mod:`.decoding`: batched generation with mixed soft prompts, and the one stop rule.

It reads no environment (:mod:`culign.defaults` does) and imports nothing of culign above it (serving, registry,
optimize), so training and serving share it whole.
"""
from . import decoding
from .decoding import GREEDY_BELOW, DecodeBatch, GenerationRequest, Token
from .hardware import (DTYPES, cpu_bf16_native, cpu_capability, cpu_flags, default_device, default_dtype,
                       parse_dtype)
from .loading import (EMBEDDED_ID, EMBEDDED_NAME, LoadedModel, ModelLoadError, embedded_model_dir,
                      load_pretrained, model_source, weights_fingerprint)
from .runtime import Runtime
from . import scoring
from .scoring import DEFAULT_BLOCK

__all__ = ["DEFAULT_BLOCK", "DTYPES", "EMBEDDED_ID", "EMBEDDED_NAME", "GREEDY_BELOW", "DecodeBatch",
           "GenerationRequest", "LoadedModel", "ModelLoadError", "Runtime", "Token", "cpu_bf16_native",
           "cpu_capability", "cpu_flags", "default_device", "default_dtype", "embedded_model_dir",
           "load_pretrained", "model_source", "parse_dtype", "weights_fingerprint", "decoding", "scoring"]

