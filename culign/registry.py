"""Adapter registry: trained soft prompts on disk, one immutable folder per region and version.

Layout: ``<root>/<REGION>/<version>/`` with ``adapter_model.safetensors`` (one float32 tensor ``prompt_embeddings``
[N, hidden]), ``adapter_config.json`` (HF PEFT PROMPT_TUNING, so ``PeftModel.from_pretrained`` loads the folder),
``culign.json`` (provenance) and optional extra files. A version is written into a dot-folder and renamed into
place, so readers only ever see complete versions and a killed save leaves nothing but a dot-folder behind.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
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

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
HIGH_WATER_FILE = ".last-version"  # highest version ever published in a region, so numbers are never reused
STALE_AFTER_S = 3600.0
MAX_HEADER_BYTES = 1 << 20  # a one-tensor safetensors header is ~100 bytes; anything huge is garbage
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
PAUSE_ENV = "CULIGN_REGISTRY_TEST_PAUSE_S"  # test hook: sleep before each rename, so a test can kill a save there


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


class _Invalid(Exception):
    """A reason an on-disk entry is unusable; turned into AdapterCorrupt or a scan warning by the caller.

    ``kind`` says what the entry looks like: ``corrupt`` (damaged files), ``incomplete`` (files missing: a
    half-written or partial copy), ``copy`` (a version folder copied or renamed to another number or region:
    its culign.json names another version), ``unsafe`` (it leads out of the registry root).
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


REFUSAL_WORDS = {"corrupt": "corrupt", "incomplete": "incomplete (half-written or a partial copy)",
                 "copy": "a copy (its culign.json names another version or region)",
                 "unsafe": "unsafe (outside the registry root)"}


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

    @property
    def ref(self) -> str:
        return f"{self.region}@{self.version}"

    def to_dict(self) -> dict:
        return {"region": self.region, "version": self.version, "ref": self.ref, "path": str(self.path),
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim,
                "created": self.created, "loss": self.loss, "heldout_loss": self.heldout_loss,
                "gain_kept": self.gain_kept, "train_presentations": self.train_presentations,
                "interrupted": self.interrupted, "readout": self.readout, "forced_invalid": self.forced_invalid}


@dataclass(frozen=True)
class LoadedAdapter:
    info: AdapterInfo
    prompt: torch.Tensor  # float32 [N, hidden], on CPU
    provenance: dict = field(repr=False)


# ---------------------------------------------------------------------------------------------------- validation
def _check_region(region: str) -> str:
    if not isinstance(region, str) or not REGION_NAME_RE.fullmatch(region):
        raise ValueError(f"invalid region name {region!r}: use 1-64 letters, digits, '_' or '-'")
    return region


def _check_version(version: int | None) -> int | None:
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


def _dumps(obj: dict) -> bytes:
    # allow_nan=False: NaN is not JSON and breaks the browsers and clients that read culign.json.
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n").encode()


# ---------------------------------------------------------------------------------------------------- file formats
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


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _Invalid(f"{path.name} is missing", "incomplete") from None
    except (OSError, ValueError) as e:
        raise _Invalid(f"{path.name} is unreadable: {e}") from None
    if not isinstance(obj, dict):
        raise _Invalid(f"{path.name} is not a JSON object")
    return obj


def _field(obj: dict, key: str, kind: type, source: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Invalid(f"{source} field {key!r} is missing or not {kind.__name__}: {value!r}")
    return value


def _optional_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _int_or_none(*candidates: Any) -> int | None:
    return next((c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c > 0), None)


def _safetensors_shape(path: Path) -> list[int]:
    """Shape of ``prompt_embeddings`` from the header alone; the file size must match what the header promises.

    Costs one small read, so scan() catches truncated or foreign weight files without hashing them.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _Invalid(f"{WEIGHTS_FILE} is truncated ({size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _Invalid(f"{WEIGHTS_FILE} is truncated or not safetensors (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise _Invalid(f"{WEIGHTS_FILE} is missing", "incomplete") from None
    except (OSError, ValueError) as e:
        raise _Invalid(f"{WEIGHTS_FILE} header is unreadable: {e}") from None
    entry = header.get(TENSOR_KEY) if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise _Invalid(f"{WEIGHTS_FILE} has no tensor {TENSOR_KEY!r}")
    if entry.get("dtype") not in SAFETENSORS_FLOAT_DTYPES:
        raise _Invalid(f"{WEIGHTS_FILE} tensor {TENSOR_KEY!r} has dtype {entry.get('dtype')!r}, not a float")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if 8 + n + max(ends, default=0) != size:
        raise _Invalid(f"{WEIGHTS_FILE} is truncated or padded (header promises {8 + n + max(ends, default=0)} "
                       f"bytes, file has {size})")
    return list(entry.get("shape", []))


def _read_info(region: str, version: int, path: Path) -> tuple[AdapterInfo, dict]:
    """AdapterInfo and provenance of one version folder from its metadata and weights header (no hashing).

    The folder's number must be the version its culign.json was stamped with (and its region the folder's, up to
    case): versions are published only by save(), so ``cp -r US/1 US/2`` is refused as a copy, here and so in
    scan(), load() and verify() alike, never listed or served as a second version.
    """
    prov = _read_json(path / PROVENANCE_FILE)
    stamped_version, stamped_region = prov.get("version"), prov.get("region")
    if stamped_version != version or isinstance(stamped_version, bool):
        raise _Invalid(f"{PROVENANCE_FILE} says version {stamped_version!r} but the folder is {version}: a version "
                       "folder copied or renamed to a new number; publish it with culign (Registry.save) instead",
                       "copy")
    if not isinstance(stamped_region, str) or stamped_region.casefold() != region.casefold():
        raise _Invalid(f"{PROVENANCE_FILE} says region {stamped_region!r} but the folder is {region!r}: a version "
                       "folder copied from another region; publish it with culign (Registry.save) instead", "copy")
    config = _read_json(path / PEFT_CONFIG_FILE)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise _Invalid(f"{PEFT_CONFIG_FILE} peft_type is {config.get('peft_type')!r}, not 'PROMPT_TUNING'")
    n = _field(prov, "num_virtual_tokens", int, PROVENANCE_FILE)
    dim = _field(prov, "token_dim", int, PROVENANCE_FILE)
    for key, value in (("num_virtual_tokens", n), ("token_dim", dim)):
        if config.get(key) != value:
            raise _Invalid(f"{PEFT_CONFIG_FILE} {key}={config.get(key)!r} disagrees with {PROVENANCE_FILE} ({value})")
    _field(prov, "weights_sha256", str, PROVENANCE_FILE)
    shape = _safetensors_shape(path / WEIGHTS_FILE)
    if shape != [n, dim]:
        raise _Invalid(f"{WEIGHTS_FILE} holds shape {shape}, config says [{n}, {dim}]")
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
        forced_invalid=prov.get("forced_invalid") is True)
    return info, prov


def _read_weights(info: AdapterInfo, expected_sha256: str) -> torch.Tensor:
    """The prompt as float32, from one read of the file: the bytes hashed are the bytes parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        data = (info.path / WEIGHTS_FILE).read_bytes()
    except OSError as e:
        raise _Invalid(f"{WEIGHTS_FILE} is unreadable: {e}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise _Invalid(f"{WEIGHTS_FILE} sha256 {actual[:16]}... does not match culign.json {expected_sha256[:16]}...")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _Invalid(f"{WEIGHTS_FILE} is unreadable: {e}") from None
    if TENSOR_KEY not in tensors:
        raise _Invalid(f"{WEIGHTS_FILE} has no tensor {TENSOR_KEY!r}")
    prompt = tensors[TENSOR_KEY].to(torch.float32)
    if list(prompt.shape) != [info.num_virtual_tokens, info.token_dim]:
        raise _Invalid(f"{WEIGHTS_FILE} holds shape {list(prompt.shape)}, config says "
                       f"[{info.num_virtual_tokens}, {info.token_dim}]")
    if not torch.isfinite(prompt).all():
        raise _Invalid(f"{WEIGHTS_FILE} contains NaN or infinite values")
    return prompt


# ---------------------------------------------------------------------------------------------------- disk writes
def _write_durably(path: Path, data: bytes, *, replace: bool = False) -> None:
    with open(path, "wb" if replace else "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_for_tests() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def _sweep_stale(region_dir: Path) -> None:
    """Remove temp and trash entries left by saves or removals killed over an hour ago (younger ones may be live)."""
    cutoff = time.time() - STALE_AFTER_S
    for entry in region_dir.iterdir():
        if not entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        try:
            if entry.is_symlink() or entry.stat().st_mtime >= cutoff:
                continue
            log.info("removing stale %s", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:
            pass  # another process swept it first


def _high_water(region_dir: Path) -> int:
    try:
        return max(0, int((region_dir / HIGH_WATER_FILE).read_text().strip()))
    except (OSError, ValueError):
        return 0


def _raise_high_water(region_dir: Path, version: int) -> None:
    """Record that ``version`` was published, so a removed version's number is never given to other content.

    Servers cache adapters by REGION@version; reusing a number would serve a stale prompt. Best effort between
    concurrent writers: the versions on disk are always counted too, so a lost update can only matter for a
    version that is also removed within the same instant.
    """
    if version <= _high_water(region_dir):
        return
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=region_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{version}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, region_dir / HIGH_WATER_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _versions_on_disk(region_dir: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in region_dir.iterdir() if VERSION_DIR_RE.fullmatch(p.name) and p.is_dir())
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class NewVersion:
    """A version's files before it is published (the same for a folder and for an object store)."""
    weights: bytes
    config: dict
    stamped: dict  # culign.json without region and version (the publisher stamps those)
    extra: dict[str, bytes]
    shape: tuple[int, int]


def new_version(region: str, prompt: torch.Tensor, base_model: str, base_fingerprint: str, provenance: Mapping,
                files: Mapping[str, bytes] | None, num_layers: int | None, num_attention_heads: int | None
                ) -> NewVersion:
    """Check what a save was given and build the version's files; raises before anything is written."""
    _check_region(region)
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
    _dumps({**stamped, "region": region, "version": 1})  # fail on unserialisable provenance before any write
    return NewVersion(weights, config, stamped, extra, (n, dim))


# ---------------------------------------------------------------------------------------------------- registry
def open_registry(root: "str | Path", cache_dir: "str | Path | None" = None):
    """The registry at ``root``: a local folder (:class:`Registry`) or an object-store URL such as
    ``s3://bucket/prefix`` (:class:`culign.object_registry.ObjectRegistry`); both have the same methods."""
    from .object_registry import ObjectRegistry, is_url

    if is_url(str(root)):
        return ObjectRegistry(str(root), cache_dir)
    return Registry(str(root).removeprefix("file://"))


class Registry:
    """Soft prompts per region and version under one root folder. Holds no state besides the root, so any
    number of Registry objects and processes can share a root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def _inside_root(self, path: Path, ref: str) -> Path:
        # Names are validated already; this catches symlinks that lead out of the root (defence in depth).
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise RegistryError(f"adapter {ref}: {path} resolves outside the registry root {self.root}")
        return path

    def _region_dirs(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if REGION_NAME_RE.fullmatch(p.name) and p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _find_region_dir(self, region: str) -> Path | None:
        """The existing folder for a region, matched case-insensitively (exact spelling wins)."""
        dirs = self._region_dirs()
        for d in dirs:
            if d.name == region:
                return d
        matches = [d for d in dirs if d.name.casefold() == region.casefold()]
        if len(matches) > 1:
            raise RegistryError(f"region {region!r} is ambiguous: {', '.join(d.name for d in matches)} all exist")
        return matches[0] if matches else None

    def _not_found(self, what: str) -> AdapterNotFound:
        available = self.regions()
        return AdapterNotFound(f"{what}; available regions: {', '.join(available) or 'none'}", available)

    # ------------------------------------------------------------------ save
    def save(self, region: str, prompt: torch.Tensor, *, base_model: str, base_fingerprint: str,
             provenance: dict, files: dict[str, bytes] | None = None, num_layers: int | None = None,
             num_attention_heads: int | None = None) -> AdapterInfo:
        """Store a soft prompt as the next version of ``region`` and return its info.

        Stamped fields (region, version, base model, shapes, hashes, time) override caller keys of the same name.
        ``num_layers`` / ``num_attention_heads`` (default: the provenance keys of those names) only fill PEFT's
        config; PEFT takes them from the base model when they are absent.
        """
        v = new_version(region, prompt, base_model, base_fingerprint, provenance, files, num_layers,
                        num_attention_heads)
        weights, config, stamped, extra, (n, dim) = v.weights, v.config, v.stamped, v.extra, v.shape

        region_dir = self._prepare_region_dir(region)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=region_dir))
        try:
            _write_durably(tmp / WEIGHTS_FILE, weights)
            _write_durably(tmp / PEFT_CONFIG_FILE, _dumps(config))
            for name, data in extra.items():
                _write_durably(tmp / name, data)
            final = self._publish(tmp, region_dir, stamped)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info, _ = _read_info(region_dir.name, int(final.name), final)
        log.info("saved adapter %s (%d x %d) at %s", info.ref, n, dim, final)
        return info

    def _prepare_region_dir(self, region: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        region_dir = self._find_region_dir(region) or self.root / region
        region_dir.mkdir(exist_ok=True)
        self._inside_root(region_dir, region)
        _sweep_stale(region_dir)
        return region_dir

    def _publish(self, tmp: Path, region_dir: Path, stamped: dict) -> Path:
        """Rename the finished temp folder to the next free version, stamping that version into culign.json.

        A concurrent writer may take the number between our look and our rename: the rename then fails
        (the target is a non-empty folder) and we try the next number. Existing versions are never replaced,
        and numbers of removed versions are not reused.
        """
        version = 0
        for _ in range(1000):
            # Past the last number tried too: a stray file or empty folder under that name must not stall us.
            version = max(max(_versions_on_disk(region_dir), default=0), _high_water(region_dir), version) + 1
            target = region_dir / str(version)
            _write_durably(tmp / PROVENANCE_FILE, _dumps({**stamped, "region": region_dir.name, "version": version}),
                           replace=True)
            _fsync_dir(tmp)
            _pause_for_tests()
            if target.exists():  # os.rename would silently replace an empty folder; never reuse a taken name
                continue
            try:
                os.rename(tmp, target)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            _raise_high_water(region_dir, version)
            _fsync_dir(region_dir)
            return target
        raise RegistryError(f"adapter {region_dir.name}@?: no free version number after 1000 attempts")

    # ------------------------------------------------------------------ read
    def scan(self) -> tuple[list[AdapterInfo], list[str]]:
        """Every readable version, sorted by (region, version), plus one :class:`ScanWarning` per refused one
        (a str naming the adapter and why: ``SA@1 refused as corrupt: adapter_model.safetensors is truncated ...``).

        Cheap (metadata and weight headers, no hashing): a bad entry never hides the good ones.
        """
        infos, warnings = [], []
        for region_dir in self._region_dirs():
            for version in _versions_on_disk(region_dir):
                path = region_dir / str(version)
                try:
                    self._inside_root(path, f"{region_dir.name}@{version}")
                    infos.append(_read_info(region_dir.name, version, path)[0])
                except _Invalid as e:
                    warnings.append(ScanWarning(region_dir.name, version, e.kind, str(e), path))
                except RegistryError as e:
                    warnings.append(ScanWarning(region_dir.name, version, "unsafe", str(e), path))
        for w in warnings:
            log.debug("scan skipped %s", w)
        return sorted(infos, key=lambda i: (i.region, i.version)), warnings

    def regions(self) -> list[str]:
        return sorted({info.region for info in self.scan()[0]})

    def versions(self, region: str) -> list[int]:
        """Readable versions of a region, ascending; AdapterNotFound when it has none."""
        region_dir = self._existing_region_dir(_check_region(region))
        good = [v for v in _versions_on_disk(region_dir) if self._try_read(region_dir, v) is not None]
        if not good:
            raise self._not_found(f"adapter {region} has no readable versions")
        return good

    def _existing_region_dir(self, region: str) -> Path:
        region_dir = self._find_region_dir(region)
        if region_dir is None:
            raise self._not_found(f"no adapter for region {region!r}")
        return self._inside_root(region_dir, region)

    def _try_read(self, region_dir: Path, version: int) -> AdapterInfo | None:
        try:
            return _read_info(region_dir.name, version, self._inside_root(region_dir / str(version),
                                                                          f"{region_dir.name}@{version}"))[0]
        except (_Invalid, RegistryError) as e:
            log.warning("skipping adapter %s@%d: %s", region_dir.name, version, e)
            return None

    def resolve(self, region: str, version: int | None = None) -> AdapterInfo:
        """Info of REGION@version; version None is the highest readable version."""
        return self._resolve(region, version)[0]

    def _resolve(self, region: str, version: int | None) -> tuple[AdapterInfo, dict]:
        _check_version(version)
        region_dir = self._existing_region_dir(_check_region(region))
        on_disk = _versions_on_disk(region_dir)
        if version is None:
            reasons = []
            for v in reversed(on_disk):  # latest readable: a broken newest version must not take the region down
                try:
                    _read_info(region_dir.name, v, self._inside_root(region_dir / str(v), f"{region_dir.name}@{v}"))
                    version = v
                    break
                except (_Invalid, RegistryError) as e:
                    kind = getattr(e, "kind", "unsafe")
                    log.warning("skipping adapter %s@%d: %s", region_dir.name, v, e)
                    reasons.append(f"{region_dir.name}@{v} refused as {REFUSAL_WORDS[kind]}: {e}")
            else:
                if reasons:  # it is there, but nothing in it may be served: say why, not "unknown"
                    raise AdapterCorrupt(f"adapter {region_dir.name} is refused, no version passes the checks: "
                                         + "; ".join(reasons))
                raise self._not_found(f"adapter {region_dir.name} has no readable versions")
        elif version not in on_disk:
            raise AdapterNotFound(f"adapter {region_dir.name}@{version} not found; versions: {on_disk}",
                                  self.regions())
        ref = f"{region_dir.name}@{version}"
        path = self._inside_root(region_dir / str(version), ref)
        try:
            return _read_info(region_dir.name, version, path)
        except _Invalid as e:
            raise AdapterCorrupt(f"adapter {ref} is refused as {REFUSAL_WORDS[e.kind]}: {e} ({path})") from None

    def load(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
             base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter:
        """Read and check an adapter: compatibility with the caller's model first (cheap), then integrity."""
        return checked_load(*self._resolve(region, version), hidden_size, base_fingerprint, allow_base_mismatch)

    def verify(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
               base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> list[str]:
        """Every problem load() would raise for, plus metadata that disagrees with the folder; [] when sound.

        Unknown adapters and invalid names still raise (AdapterNotFound / ValueError): there is nothing to verify.
        """
        try:
            info, prov = self._resolve(region, version)
        except AdapterCorrupt as e:
            return [str(e)]
        # a folder whose culign.json names another region or version failed in _resolve already
        return problems_of(info, prov, hidden_size, base_fingerprint, allow_base_mismatch)

    # ------------------------------------------------------------------ remove
    def remove(self, region: str, version: int | None = None) -> list[AdapterInfo]:
        """Remove one version, or every version when version is None (unreadable ones too).

        Each version is renamed to a dot-folder first, so readers see it whole or not at all. The region folder
        stays, holding the highest number used, so a later save never reuses a removed version's number. Returns
        what was removed; an unreadable version is reported with empty metadata.
        """
        _check_version(version)
        region_dir = self._existing_region_dir(_check_region(region))
        on_disk = _versions_on_disk(region_dir)
        if version is not None and version not in on_disk:
            raise AdapterNotFound(f"adapter {region_dir.name}@{version} not found; versions: {on_disk}",
                                  self.regions())
        if not on_disk:
            raise self._not_found(f"adapter {region_dir.name} has no versions")
        doomed = [version] if version is not None else on_disk
        _raise_high_water(region_dir, max(doomed))  # also covers versions not published by save (copied in)
        return [self._remove_version(region_dir, v) for v in doomed]

    def _remove_version(self, region_dir: Path, version: int) -> AdapterInfo:
        ref = f"{region_dir.name}@{version}"
        path = self._inside_root(region_dir / str(version), ref)
        info = self._try_read(region_dir, version) or AdapterInfo(
            region=region_dir.name, version=version, path=path, base_model="", base_fingerprint="",
            num_virtual_tokens=0, token_dim=0, created="")
        trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{version}-", dir=region_dir))
        os.rename(path, trash / "v")  # atomic: the version disappears whole; the rmtree below may take its time
        _fsync_dir(region_dir)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed adapter %s", ref)
        return info


def checked_load(info: AdapterInfo, prov: dict, hidden_size: int | None, base_fingerprint: str | None,
                 allow_base_mismatch: bool) -> LoadedAdapter:
    """A resolved version's prompt: compatibility with the caller's model first (cheap), then integrity."""
    for problem in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch):
        raise AdapterIncompatible(f"adapter {info.ref} is incompatible: {problem}")
    try:
        prompt = _read_weights(info, prov["weights_sha256"])
    except _Invalid as e:
        raise AdapterCorrupt(f"adapter {info.ref} is refused as corrupt: {e} ({info.path})") from None
    return LoadedAdapter(info=info, prompt=prompt, provenance=prov)


def problems_of(info: AdapterInfo, prov: dict, hidden_size: int | None, base_fingerprint: str | None,
                allow_base_mismatch: bool) -> list[str]:
    """Everything checked_load() would refuse a resolved version for; [] when sound."""
    problems = [f"adapter {info.ref} is incompatible: {p}"
                for p in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch)]
    try:
        _read_weights(info, prov["weights_sha256"])
    except _Invalid as e:
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


def _safetensors_bytes(values: torch.Tensor) -> bytes:
    from safetensors.torch import save as save_safetensors

    return save_safetensors({TENSOR_KEY: values}, metadata={"format": "pt"})  # PEFT writes the same metadata


def _culign_version() -> str:
    from . import __version__

    return __version__
