"""The on-disk format of one adapter version, the same in a folder and in an object store.

A version holds ``adapter_model.safetensors`` (one float32 tensor ``prompt_embeddings`` [N, hidden]),
``adapter_config.json`` (HF PEFT PROMPT_TUNING, so ``PeftModel.from_pretrained`` loads the folder), ``culign.json``
(provenance, stamped with the region and version it was published as) and optional extra files. This module builds
those files (:func:`new_version`), reads them back (:func:`read_info`) and checks them (:func:`checked_load`,
:func:`problems_of`); where they live and how a version is published is the backends' business.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger("culign.registry")

REGION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VERSION_DIR_RE = re.compile(r"^[1-9][0-9]{0,8}$")  # canonical positive integers only: "01" would alias "1"
EXTRA_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PROVENANCE_FILE = "culign.json"
RESERVED_FILES = frozenset({WEIGHTS_FILE, PEFT_CONFIG_FILE, PROVENANCE_FILE})
TENSOR_KEY = "prompt_embeddings"  # the key PEFT's prompt-learning loader reads (BasePromptEncoder)
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose adapter_config.json layout is written (and tested) here
SAVED_DTYPE = "float32"
TMP_PREFIX = ".tmp-"  # a folder still being written (a version before its rename, a download before it is checked)
MAX_HEADER_BYTES = 1 << 20  # a one-tensor safetensors header is ~100 bytes; anything huge is garbage
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


# ---------------------------------------------------------------------------------------------------- errors
class RegistryError(Exception):
    """Base of every registry failure; the message names the adapter (REGION@version) and why."""


class AdapterNotFound(RegistryError):
    def __init__(self, message: str, available: list[str] | None = None):
        super().__init__(message)
        self.available: list[str] = list(available or [])


class AdapterCorrupt(RegistryError):
    pass


class AdapterIncompatible(RegistryError):
    pass


class RegistryUnavailable(RegistryError):
    """An object-store registry could not be reached or refused the credentials (the message holds no secret)."""


REFUSAL_WORDS = {"corrupt": "corrupt", "incomplete": "incomplete (half-written or a partial copy)",
                 "copy": "a copy (its culign.json names another version or region)",
                 "unsafe": "unsafe (outside the registry root)"}


class InvalidEntry(Exception):
    """A reason a stored version is unusable; the registry turns it into AdapterCorrupt or a scan warning.

    ``kind`` says what the entry looks like: ``corrupt`` (damaged files), ``incomplete`` (files missing: a
    half-written or partial copy), ``copy`` (a version folder copied or renamed to another number or region:
    its culign.json names another version), ``unsafe`` (it leads out of the registry root).
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind

    @property
    def refused_as(self) -> str:
        return REFUSAL_WORDS.get(self.kind, self.kind)


class ScanWarning(str):
    """One entry scan() could not list, as the text operators read (``US@2 refused as a copy: ... (path)``), with
    the parts a server needs to answer for it: ``region``, ``version``, ``ref``, ``kind`` and ``reason``."""

    region: str
    version: int
    kind: str
    reason: str
    path: Path

    def __new__(cls, region: str, version: int, kind: str, reason: str, path: Path) -> "ScanWarning":
        self = super().__new__(cls, f"{region}@{version} refused as {REFUSAL_WORDS.get(kind, kind)}: {reason} "
                                    f"({path})")
        self.region, self.version, self.kind, self.reason, self.path = region, version, kind, reason, Path(path)
        return self

    @property
    def ref(self) -> str:
        return f"{self.region}@{self.version}"


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AdapterInfo:
    region: str
    version: int
    path: Path
    base_model: str
    base_fingerprint: str
    num_virtual_tokens: int
    token_dim: int
    created: str
    loss: float | None = None  # training loss (mean over the training presentations)
    heldout_loss: float | None = None
    gain_kept: float | None = None
    train_presentations: int | None = None  # how many presentations it was trained on (1: a single wording)
    interrupted: bool = False  # saved from a search stopped before its budget was spent
    readout: str = "digit"  # how answers were read in training (culign.validity, survey.READOUTS)
    forced_invalid: bool = False  # trained with --force-invalid: no read-out of its model passed the validity check
    verdict: str = "not judged"  # the post-training verdict (culign.verdict, which this layer may not import: its
    # NOT_JUDGED words, tested equal) from provenance; "not judged" for adapters saved before verdicts existed

    @classmethod
    def unreadable(cls, region: str, version: int, path: Path) -> "AdapterInfo":
        """What remove() reports for a version it could not read: its name and nothing else."""
        return cls(region=region, version=version, path=path, base_model="", base_fingerprint="",
                   num_virtual_tokens=0, token_dim=0, created="")

    @property
    def ref(self) -> str:
        return f"{self.region}@{self.version}"

    def to_dict(self) -> dict:
        return {"region": self.region, "version": self.version, "ref": self.ref, "path": str(self.path),
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim,
                "created": self.created, "loss": self.loss, "heldout_loss": self.heldout_loss,
                "gain_kept": self.gain_kept, "train_presentations": self.train_presentations,
                "interrupted": self.interrupted, "readout": self.readout, "forced_invalid": self.forced_invalid,
                "verdict": self.verdict}


@dataclass(frozen=True)
class LoadedAdapter:
    info: AdapterInfo
    prompt: torch.Tensor  # float32 [N, hidden], on CPU
    provenance: dict = field(repr=False)


# ---------------------------------------------------------------------------------------------------- validation
def check_region(region: str) -> str:
    if not isinstance(region, str) or not REGION_NAME_RE.fullmatch(region):
        raise ValueError(f"invalid region name {region!r}: use 1-64 letters, digits, '_' or '-'")
    return region


def check_version(version: int | None) -> int | None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"invalid version {version!r}: a positive integer or None (latest)")
    return version


def _check_prompt(prompt: torch.Tensor) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or min(prompt.shape) < 1:
        shape = list(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"soft prompt must be a non-empty 2-D tensor [N, hidden], got {shape}")
    if not prompt.is_floating_point():
        raise ValueError(f"soft prompt must be floating point, got {prompt.dtype}")
    values = prompt.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(values).all():
        raise ValueError("soft prompt contains NaN or infinite values")
    return values


def _check_files(files: Mapping[str, bytes] | None) -> dict[str, bytes]:
    checked = {}
    for name, data in (files or {}).items():
        if not isinstance(name, str) or not EXTRA_FILE_RE.fullmatch(name) or name in RESERVED_FILES:
            raise ValueError(f"invalid extra file name {name!r}: use a plain file name, "
                             f"not one of {sorted(RESERVED_FILES)}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra file {name!r} must be bytes, got {type(data).__name__}")
        checked[name] = bytes(data)
    return checked


def _json_default(value: Any) -> Any:
    # numpy / torch scalars (losses, scores) and paths are common in provenance; anything else is a caller bug.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"provenance value of type {type(value).__name__} is not JSON serializable")


def dump_json(obj: dict) -> bytes:
    """The bytes of every JSON file culign writes: sorted keys, indented, one trailing newline."""
    # allow_nan=False: NaN is not JSON and breaks the browsers and clients that read culign.json.
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n").encode()


# ---------------------------------------------------------------------------------------------------- writing
def peft_config(num_virtual_tokens: int, token_dim: int, base_model: str, num_layers: int | None = None,
                num_attention_heads: int | None = None) -> dict:
    """The adapter_config.json PEFT writes for a PROMPT_TUNING adapter (every field, so it reads back unchanged).

    PEFT fills a null num_layers / num_attention_heads from the base model's config when it loads the adapter.
    """
    return {
        "auto_mapping": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "modules_to_save": None, "num_attention_heads": num_attention_heads, "num_layers": num_layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": num_virtual_tokens, "peft_type": "PROMPT_TUNING",
        "peft_version": PEFT_FORMAT_VERSION, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "revision": None, "task_type": "CAUSAL_LM", "token_dim": token_dim, "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


@dataclass(frozen=True)
class NewVersion:
    """A version's files before it is published (the same for a folder and for an object store)."""
    weights: bytes
    config: dict
    stamped: dict  # culign.json without region and version (the publisher stamps those)
    extra: dict[str, bytes]
    shape: tuple[int, int]

    def provenance_file(self, region: str, version: int) -> bytes:
        """culign.json as published under REGION@version: a copy to another number is then recognisable."""
        return dump_json({**self.stamped, "region": region, "version": version})

    def files(self, region: str, version: int) -> dict[str, bytes]:
        """Every file of the version published as REGION@version, by name."""
        return {WEIGHTS_FILE: self.weights, PEFT_CONFIG_FILE: dump_json(self.config),
                PROVENANCE_FILE: self.provenance_file(region, version), **self.extra}


def _int_or_none(*candidates: Any) -> int | None:
    return next((c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c > 0), None)


def _safetensors_bytes(values: torch.Tensor) -> bytes:
    from safetensors.torch import save as save_safetensors

    return save_safetensors({TENSOR_KEY: values}, metadata={"format": "pt"})  # PEFT writes the same metadata


def _culign_version() -> str:
    from culign import __version__

    return __version__


def new_version(region: str, prompt: torch.Tensor, base_model: str, base_fingerprint: str, provenance: Mapping,
                files: Mapping[str, bytes] | None, num_layers: int | None, num_attention_heads: int | None
                ) -> NewVersion:
    """Check what a save was given and build the version's files; raises before anything is written."""
    check_region(region)
    values = _check_prompt(prompt)
    extra = _check_files(files)
    if not isinstance(provenance, Mapping):
        raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
    n, dim = values.shape
    weights = _safetensors_bytes(values)
    config = peft_config(n, dim, base_model, num_layers=_int_or_none(num_layers, provenance.get("num_layers")),
                         num_attention_heads=_int_or_none(num_attention_heads, provenance.get("num_attention_heads")))
    stamped = {**provenance, "base_model": base_model, "base_fingerprint": base_fingerprint,
               "num_virtual_tokens": n, "token_dim": dim, "dtype": SAVED_DTYPE, "culign_version": _culign_version(),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "weights_sha256": hashlib.sha256(weights).hexdigest()}
    version = NewVersion(weights, config, stamped, extra, (n, dim))
    version.provenance_file(region, 1)  # fail on unserialisable provenance before any write
    return version


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidEntry(f"{path.name} is missing", "incomplete") from None
    except (OSError, ValueError) as e:
        raise InvalidEntry(f"{path.name} is unreadable: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidEntry(f"{path.name} is not a JSON object")
    return obj


def _field(obj: dict, key: str, kind: type, source: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidEntry(f"{source} field {key!r} is missing or not {kind.__name__}: {value!r}")
    return value


def _optional_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _safetensors_shape(path: Path) -> list[int]:
    """Shape of ``prompt_embeddings`` from the header alone; the file size must match what the header promises.

    Costs one small read, so scan() catches truncated or foreign weight files without hashing them.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InvalidEntry(f"{WEIGHTS_FILE} is truncated ({size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InvalidEntry(f"{WEIGHTS_FILE} is truncated or not safetensors (header of {n} bytes, "
                                   f"file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise InvalidEntry(f"{WEIGHTS_FILE} is missing", "incomplete") from None
    except (OSError, ValueError) as e:
        raise InvalidEntry(f"{WEIGHTS_FILE} header is unreadable: {e}") from None
    entry = header.get(TENSOR_KEY) if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise InvalidEntry(f"{WEIGHTS_FILE} has no tensor {TENSOR_KEY!r}")
    if entry.get("dtype") not in SAFETENSORS_FLOAT_DTYPES:
        raise InvalidEntry(f"{WEIGHTS_FILE} tensor {TENSOR_KEY!r} has dtype {entry.get('dtype')!r}, not a float")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if 8 + n + max(ends, default=0) != size:
        raise InvalidEntry(f"{WEIGHTS_FILE} is truncated or padded (header promises {8 + n + max(ends, default=0)} "
                           f"bytes, file has {size})")
    return list(entry.get("shape", []))


def read_info(region: str, version: int, path: Path) -> tuple[AdapterInfo, dict]:
    """AdapterInfo and provenance of one version folder from its metadata and weights header (no hashing).

    The folder's number must be the version its culign.json was stamped with (and its region the folder's, up to
    case): versions are published only by save(), so ``cp -r US/1 US/2`` is refused as a copy, here and so in
    scan(), load() and verify() alike, never listed or served as a second version.
    """
    prov = _read_json(path / PROVENANCE_FILE)
    stamped_version, stamped_region = prov.get("version"), prov.get("region")
    if stamped_version != version or isinstance(stamped_version, bool):
        raise InvalidEntry(f"{PROVENANCE_FILE} says version {stamped_version!r} but the folder is {version}: a "
                           "version folder copied or renamed to a new number; publish it with culign "
                           "(Registry.save) instead", "copy")
    if not isinstance(stamped_region, str) or stamped_region.casefold() != region.casefold():
        raise InvalidEntry(f"{PROVENANCE_FILE} says region {stamped_region!r} but the folder is {region!r}: a "
                           "version folder copied from another region; publish it with culign (Registry.save) "
                           "instead", "copy")
    config = _read_json(path / PEFT_CONFIG_FILE)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise InvalidEntry(f"{PEFT_CONFIG_FILE} peft_type is {config.get('peft_type')!r}, not 'PROMPT_TUNING'")
    n = _field(prov, "num_virtual_tokens", int, PROVENANCE_FILE)
    dim = _field(prov, "token_dim", int, PROVENANCE_FILE)
    for key, value in (("num_virtual_tokens", n), ("token_dim", dim)):
        if config.get(key) != value:
            raise InvalidEntry(f"{PEFT_CONFIG_FILE} {key}={config.get(key)!r} disagrees with {PROVENANCE_FILE} "
                               f"({value})")
    _field(prov, "weights_sha256", str, PROVENANCE_FILE)
    shape = _safetensors_shape(path / WEIGHTS_FILE)
    if shape != [n, dim]:
        raise InvalidEntry(f"{WEIGHTS_FILE} holds shape {shape}, config says [{n}, {dim}]")
    info = AdapterInfo(
        region=region, version=version, path=path,
        base_model=_field(prov, "base_model", str, PROVENANCE_FILE),
        base_fingerprint=_field(prov, "base_fingerprint", str, PROVENANCE_FILE),
        num_virtual_tokens=n, token_dim=dim,
        created=_field(prov, "created", str, PROVENANCE_FILE),
        loss=_optional_float(prov.get("loss")), heldout_loss=_optional_float(prov.get("heldout_loss")),
        gain_kept=_optional_float(prov.get("gain_kept")),
        train_presentations=len(prov["train_presentations"]) if isinstance(prov.get("train_presentations"), list)
        else None,
        interrupted=prov.get("interrupted") is True,
        readout=prov.get("readout") if isinstance(prov.get("readout"), str) else "digit",
        forced_invalid=prov.get("forced_invalid") is True, verdict=verdict_of(prov))
    return info, prov


def verdict_of(record: Mapping) -> str:
    """The post-training verdict a provenance (or training report) recorded; "not judged" where it predates
    verdicts."""
    v = record.get("verdict")
    return v["verdict"] if isinstance(v, Mapping) and isinstance(v.get("verdict"), str) else AdapterInfo.verdict


def read_weights(info: AdapterInfo, expected_sha256: str) -> torch.Tensor:
    """The prompt as float32, from one read of the file: the bytes hashed are the bytes parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        data = (info.path / WEIGHTS_FILE).read_bytes()
    except OSError as e:
        raise InvalidEntry(f"{WEIGHTS_FILE} is unreadable: {e}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise InvalidEntry(f"{WEIGHTS_FILE} sha256 {actual[:16]}... does not match culign.json "
                           f"{expected_sha256[:16]}...")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidEntry(f"{WEIGHTS_FILE} is unreadable: {e}") from None
    if TENSOR_KEY not in tensors:
        raise InvalidEntry(f"{WEIGHTS_FILE} has no tensor {TENSOR_KEY!r}")
    prompt = tensors[TENSOR_KEY].to(torch.float32)
    if list(prompt.shape) != [info.num_virtual_tokens, info.token_dim]:
        raise InvalidEntry(f"{WEIGHTS_FILE} holds shape {list(prompt.shape)}, config says "
                           f"[{info.num_virtual_tokens}, {info.token_dim}]")
    if not torch.isfinite(prompt).all():
        raise InvalidEntry(f"{WEIGHTS_FILE} contains NaN or infinite values")
    return prompt


# ---------------------------------------------------------------------------------------------------- checks
def checked_load(info: AdapterInfo, prov: dict, hidden_size: int | None, base_fingerprint: str | None,
                 allow_base_mismatch: bool) -> LoadedAdapter:
    """A resolved version's prompt: compatibility with the caller's model first (cheap), then integrity."""
    for problem in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch):
        raise AdapterIncompatible(f"adapter {info.ref} is incompatible: {problem}")
    try:
        prompt = read_weights(info, prov["weights_sha256"])
    except InvalidEntry as e:
        raise AdapterCorrupt(f"adapter {info.ref} is refused as corrupt: {e} ({info.path})") from None
    return LoadedAdapter(info=info, prompt=prompt, provenance=prov)


def problems_of(info: AdapterInfo, prov: dict, hidden_size: int | None, base_fingerprint: str | None,
                allow_base_mismatch: bool) -> list[str]:
    """Everything checked_load() would refuse a resolved version for; [] when sound."""
    problems = [f"adapter {info.ref} is incompatible: {p}"
                for p in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch)]
    try:
        read_weights(info, prov["weights_sha256"])
    except InvalidEntry as e:
        problems.append(f"adapter {info.ref} is refused as corrupt: {e}")
    return problems


def _compatibility_problems(info: AdapterInfo, hidden_size: int | None, base_fingerprint: str | None,
                            allow_base_mismatch: bool) -> list[str]:
    problems = []
    if hidden_size is not None and hidden_size != info.token_dim:
        # Never overridable: the prompt cannot even be fed to a model of another width.
        problems.append(f"prompt width {info.token_dim} does not match the model's hidden size {hidden_size}")
    if base_fingerprint is not None and base_fingerprint != info.base_fingerprint:
        message = (f"trained on base model {info.base_model!r} ({info.base_fingerprint}), "
                   f"the loaded model is {base_fingerprint}")
        if allow_base_mismatch:
            log.warning("adapter %s: %s; loading anyway (allow_base_mismatch)", info.ref, message)
        else:
            problems.append(message)
    return problems
