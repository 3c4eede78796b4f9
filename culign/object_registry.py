"""The adapter registry on object storage (``s3://bucket/prefix``, through fsspec): what every replica serves from.

An object store has no rename, so a version is published in three steps, each visible only as far as it is done:

1. **claim** the number: a create-only write (``If-None-Match: *``) of ``<REGION>/<v>/.claim``; a publisher that
   loses the race gets 412 and tries ``v + 1``, so two trainers never take the same number;
2. **upload** the version's files under ``<REGION>/<v>/`` (the same files as a local version folder);
3. **publish** ``<REGION>/<v>/manifest.json`` last, create-only, with each file's sha256 and size.

Readers list only versions with a manifest; every file must be there with the manifest's size and hash before a
version is used. A version's bytes are downloaded once into a local cache (verified against the manifest), and the
local registry's own checks (:mod:`culign.registry`) then run on that folder, so an object-store version passes
exactly the checks a local one does. Removing deletes the manifest first (the version disappears whole), then the
files; the claim stays, so a number is never given to other content (servers cache by REGION@version).

Credentials come from the usual AWS chain (environment, ``~/.aws``, ``AWS_ENDPOINT_URL``), never from culign's files,
and are never logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import torch

from .registry import (PEFT_CONFIG_FILE, PROVENANCE_FILE, REFUSAL_WORDS, REGION_NAME_RE, VERSION_DIR_RE,
                       WEIGHTS_FILE, AdapterCorrupt, AdapterIncompatible, AdapterInfo, AdapterNotFound,
                       LoadedAdapter, RegistryError, RegistryUnavailable, ScanWarning, _check_files, _check_prompt, _check_region,
                       _check_version, _compatibility_problems, _culign_version, _dumps, _int_or_none, _Invalid,
                       _read_info, _read_weights, _safetensors_bytes, peft_config)

log = logging.getLogger("culign.registry")

MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
MANIFEST_FORMAT = 1
URL_RE = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<bucket>[^/]*)(?:/(?P<prefix>.*))?$")


def is_url(root: str | os.PathLike) -> bool:
    return isinstance(root, str) and bool(URL_RE.match(root)) and not root.startswith("file://")


def _describe(error: BaseException) -> str:
    """A store error in words, without credentials (botocore messages name the key id at most)."""
    text = f"{type(error).__name__}: {error}"
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text[:300]


def _unavailable(url: str, error: BaseException) -> RegistryUnavailable:
    text = str(error)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return RegistryUnavailable(f"registry {url}: the bucket does not exist (create it first)")
    if isinstance(error, PermissionError) or any(w in text for w in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                      "AccessDenied", "Forbidden")):
        return RegistryUnavailable(f"registry {url} refused the credentials (check AWS_ACCESS_KEY_ID / "
                                   f"AWS_SECRET_ACCESS_KEY or ~/.aws): {_describe(error)}")
    return RegistryUnavailable(f"registry {url} is unreachable: {_describe(error)}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectRegistry:
    """The :class:`culign.registry.Registry` interface over an fsspec URL. Stateless but for the local cache of
    verified downloads, so any number of processes and machines can share a store."""

    def __init__(self, url: str, cache_dir: str | Path | None = None, fs=None):
        m = URL_RE.match(url)
        if not m or not m["bucket"]:
            raise ValueError(f"invalid registry URL {url!r}: use s3://BUCKET[/PREFIX]")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", m["bucket"]):
            raise ValueError(f"invalid bucket {m['bucket']!r} in {url!r}: 3-63 lower-case letters, digits, '.', '-'")
        self.url = url.rstrip("/")
        self.scheme, self.bucket = m["scheme"], m["bucket"]
        self.base = f"{self.bucket}/{m['prefix'].strip('/')}".rstrip("/") if m["prefix"] else self.bucket
        self.root = self.url  # what messages and listings print
        self._fs = fs
        if cache_dir is None:
            from .runtime import cache_root

            cache_dir = cache_root() / "registry-cache"
        self.cache = Path(cache_dir) / hashlib.sha1(self.url.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ the store
    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            kwargs = {}
            if self.scheme == "s3":
                # no listing cache (a replica must see a new version), short timeouts and few retries (an unreachable
                # store must not stall a rescan for minutes)
                kwargs = {"use_listings_cache": False, "skip_instance_cache": True,
                          "config_kwargs": {"connect_timeout": 3, "read_timeout": 20,
                                            "retries": {"max_attempts": 2}}}
            try:
                self._fs = fsspec.filesystem(self.scheme, **kwargs)
            except (ImportError, ValueError) as e:
                raise RegistryError(f"registry {self.url}: no filesystem for {self.scheme}:// ({e}); "
                                    f"for s3:// install s3fs") from None
            if hasattr(self._fs, "retries"):
                self._fs.retries = 2
        return self._fs

    def _key(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _call(self, what, *args, **kwargs):
        try:
            return what(*args, **kwargs)
        except (FileNotFoundError, RegistryError, ValueError, TypeError):
            raise
        except Exception as e:  # botocore / aiohttp errors come through as many types
            raise _unavailable(self.url, e) from None

    def _listing(self) -> dict[str, dict]:
        """Every object under the prefix: key relative to it -> {size, etag}. One paginated LIST."""
        try:
            found = self._call(self.fs.find, self.base, detail=True)
        except FileNotFoundError:
            found = {}
        if not found and not self._call(self.fs.exists, self.bucket):
            raise RegistryUnavailable(f"registry {self.url}: the bucket {self.bucket!r} does not exist (create it "
                                      f"first)")
        cut = len(self.base) + 1
        return {k[cut:]: {"size": v.get("size"), "etag": str(v.get("ETag") or v.get("etag") or v.get("mtime"))}
                for k, v in found.items() if k.startswith(self.base + "/") and v.get("type", "file") == "file"}

    def _put_new(self, rel: str, data: bytes) -> bool:
        """Create-only write: False when the object exists already (another publisher has it)."""
        if self.scheme != "s3":
            raise RegistryError(f"registry {self.url}: publishing needs a create-only write; culign implements it "
                                f"for s3:// (If-None-Match)")
        from botocore.exceptions import ClientError
        from fsspec.asyn import sync

        async def put():
            s3 = await self.fs.get_s3(self.bucket)
            try:
                await s3.put_object(Bucket=self.bucket, Key=self._key(rel).split("/", 1)[1], Body=data,
                                    IfNoneMatch="*")
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or status in (409, 412):
                    return False
                raise

        return self._call(sync, self.fs.loop, put)

    def _put(self, rel: str, data: bytes) -> None:
        self._call(self.fs.pipe_file, self._key(rel), data)

    def _get(self, rel: str) -> bytes:
        return self._call(self.fs.cat_file, self._key(rel))

    # ------------------------------------------------------------------ versions in the listing
    @staticmethod
    def _versions(listing: dict[str, dict]) -> dict[str, dict[int, set[str]]]:
        """region -> version -> file names there (claims and manifests included)."""
        out: dict[str, dict[int, set[str]]] = {}
        for rel in listing:
            parts = rel.split("/")
            if len(parts) == 3 and REGION_NAME_RE.fullmatch(parts[0]) and VERSION_DIR_RE.fullmatch(parts[1]):
                out.setdefault(parts[0], {}).setdefault(int(parts[1]), set()).add(parts[2])
        return out

    def _fetch(self, region: str, version: int, listing: dict[str, dict]) -> Path:
        """The version's files in the local cache, each checked against the manifest (downloaded once per manifest
        ETag); raises _Invalid naming what is wrong."""
        rel = f"{region}/{version}"
        etag = listing[f"{rel}/{MANIFEST_FILE}"]["etag"]
        local = self.cache / region / str(version)
        stamp = local / ".manifest-etag"
        if stamp.exists() and stamp.read_text() == etag:
            return local
        try:
            manifest = json.loads(self._get(f"{rel}/{MANIFEST_FILE}"))
        except FileNotFoundError:
            raise _Invalid(f"{MANIFEST_FILE} vanished while reading", "incomplete") from None
        except ValueError as e:
            raise _Invalid(f"{MANIFEST_FILE} is not JSON: {e}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or manifest.get("region") != region or manifest.get("version") != version:
            raise _Invalid(f"{MANIFEST_FILE} does not describe {region}@{version}", "copy"
                           if isinstance(files, dict) else "corrupt")
        for name in (WEIGHTS_FILE, PEFT_CONFIG_FILE, PROVENANCE_FILE):
            if name not in files:
                raise _Invalid(f"{MANIFEST_FILE} lists no {name}")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache))
        try:
            for name, meta in files.items():
                if not isinstance(meta, dict) or "/" in name or name.startswith("."):
                    raise _Invalid(f"{MANIFEST_FILE} entry {name!r} is malformed")
                there = listing.get(f"{rel}/{name}")
                if there is None:
                    raise _Invalid(f"{name} is missing (half-uploaded?)", "incomplete")
                if there["size"] != meta.get("size"):
                    raise _Invalid(f"{name} is {there['size']} bytes, the manifest says {meta.get('size')} "
                                   f"(half-uploaded or replaced)", "incomplete")
                try:
                    data = self._get(f"{rel}/{name}")
                except FileNotFoundError:
                    raise _Invalid(f"{name} vanished while reading", "incomplete") from None
                if _sha(data) != meta.get("sha256"):
                    raise _Invalid(f"{name} sha256 {_sha(data)[:16]}... does not match the manifest "
                                   f"{str(meta.get('sha256'))[:16]}...")
                (tmp / name).write_bytes(data)
            (tmp / ".manifest-etag").write_text(etag)
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.exists():
                shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
        except FileExistsError:  # another process of this machine cached it at the same moment
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return local

    def _read(self, region: str, version: int, listing: dict[str, dict]) -> tuple[AdapterInfo, dict]:
        return _read_info(region, version, self._fetch(region, version, listing))

    # ------------------------------------------------------------------ read
    def scan(self) -> tuple[list[AdapterInfo], list[str]]:
        """Like Registry.scan: readable versions (manifest present, every byte matching it) and ScanWarnings.
        A version without a manifest is not a version yet (being uploaded, or its publisher died): not listed,
        not warned about. Raises RegistryUnavailable when the store cannot be listed."""
        listing = self._listing()
        infos, warnings = [], []
        for region, versions in sorted(self._versions(listing).items()):
            for version, names in sorted(versions.items()):
                if MANIFEST_FILE not in names:
                    continue
                try:
                    infos.append(self._read(region, version, listing)[0])
                except _Invalid as e:
                    warnings.append(ScanWarning(region, version, e.kind, str(e), self.cache / region / str(version)))
        return infos, warnings

    def regions(self) -> list[str]:
        return sorted({i.region for i in self.scan()[0]})

    def _region_name(self, region: str, listing: dict[str, dict]) -> str | None:
        names = sorted(self._versions(listing))
        if region in names:
            return region
        matches = [n for n in names if n.casefold() == region.casefold()]
        if len(matches) > 1:
            raise RegistryError(f"region {region!r} is ambiguous: {', '.join(matches)} all exist")
        return matches[0] if matches else None

    def _not_found(self, what: str) -> AdapterNotFound:
        available = self.regions()
        return AdapterNotFound(f"{what}; available regions: {', '.join(available) or 'none'}", available)

    def versions(self, region: str) -> list[int]:
        _check_region(region)
        good = sorted(i.version for i in self.scan()[0] if i.region.casefold() == region.casefold())
        if not good:
            raise self._not_found(f"adapter {region} has no readable versions")
        return good

    def resolve(self, region: str, version: int | None = None) -> AdapterInfo:
        return self._resolve(region, version)[0]

    def _resolve(self, region: str, version: int | None) -> tuple[AdapterInfo, dict]:
        _check_version(version)
        _check_region(region)
        listing = self._listing()
        name = self._region_name(region, listing)
        if name is None:
            raise self._not_found(f"no adapter for region {region!r}")
        published = sorted(v for v, names in self._versions(listing)[name].items() if MANIFEST_FILE in names)
        if version is None:
            reasons = []
            for v in reversed(published):
                try:
                    return self._read(name, v, listing)
                except _Invalid as e:
                    reasons.append(f"{name}@{v} refused as {REFUSAL_WORDS.get(e.kind, e.kind)}: {e}")
            if reasons:
                raise AdapterCorrupt(f"adapter {name} is refused, no version passes the checks: " + "; ".join(reasons))
            raise self._not_found(f"adapter {name} has no readable versions")
        if version not in published:
            raise AdapterNotFound(f"adapter {name}@{version} not found; versions: {published}", self.regions())
        try:
            return self._read(name, version, listing)
        except _Invalid as e:
            raise AdapterCorrupt(f"adapter {name}@{version} is refused as {REFUSAL_WORDS.get(e.kind, e.kind)}: "
                                 f"{e} ({self.url})") from None

    def _cached(self, region: str, version: int | None) -> tuple[AdapterInfo, dict] | None:
        """A version verified earlier, from the local cache alone (for when the store is unreachable)."""
        base = self.cache
        dirs = [d for d in base.iterdir() if d.name.casefold() == region.casefold()] if base.exists() else []
        for d in dirs:
            have = sorted((int(p.name) for p in d.iterdir() if VERSION_DIR_RE.fullmatch(p.name)
                           and (p / ".manifest-etag").exists()), reverse=True)
            for v in have if version is None else [version] if version in have else []:
                try:
                    return _read_info(d.name, v, d / str(v))
                except _Invalid:
                    continue
        return None

    def load(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
             base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter:
        try:
            info, prov = self._resolve(region, version)
        except RegistryUnavailable:
            cached = self._cached(region, version)
            if cached is None:
                raise
            info, prov = cached
            log.warning("registry %s unreachable: loading %s from the verified local copy", self.url, info.ref)
        for problem in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch):
            raise AdapterIncompatible(f"adapter {info.ref} is incompatible: {problem}")
        try:
            prompt = _read_weights(info, prov["weights_sha256"])
        except _Invalid as e:
            raise AdapterCorrupt(f"adapter {info.ref} is refused as corrupt: {e} ({self.url})") from None
        return LoadedAdapter(info=info, prompt=prompt, provenance=prov)

    def verify(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
               base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> list[str]:
        """Every problem, with the bytes downloaded afresh (the local cache is not trusted for this)."""
        shutil.rmtree(self.cache / region / str(version), ignore_errors=True) if version else None
        try:
            info, prov = self._resolve(region, version)
        except AdapterCorrupt as e:
            return [str(e)]
        problems = [f"adapter {info.ref} is incompatible: {p}"
                    for p in _compatibility_problems(info, hidden_size, base_fingerprint, allow_base_mismatch)]
        try:
            _read_weights(info, prov["weights_sha256"])
        except _Invalid as e:
            problems.append(f"adapter {info.ref} is refused as corrupt: {e}")
        return problems

    # ------------------------------------------------------------------ write
    def save(self, region: str, prompt: torch.Tensor, *, base_model: str, base_fingerprint: str,
             provenance: dict, files: dict[str, bytes] | None = None, num_layers: int | None = None,
             num_attention_heads: int | None = None) -> AdapterInfo:
        """Publish the next version of ``region``: claim a number (create-only), upload, write the manifest last."""
        _check_region(region)
        values = _check_prompt(prompt)
        extra = _check_files(files)
        if not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
        n, dim = values.shape
        weights = _safetensors_bytes(values)
        config = peft_config(n, dim, base_model, num_layers=_int_or_none(num_layers, provenance.get("num_layers")),
                             num_attention_heads=_int_or_none(num_attention_heads,
                                                              provenance.get("num_attention_heads")))
        stamped = {**provenance, "base_model": base_model, "base_fingerprint": base_fingerprint,
                   "num_virtual_tokens": n, "token_dim": dim, "dtype": "float32",
                   "culign_version": _culign_version(),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "weights_sha256": _sha(weights)}
        _dumps({**stamped, "region": region, "version": 1})  # fail on unserialisable provenance before any write
        listing = self._listing()
        name = self._region_name(region, listing) or region
        claimed = self._versions(listing).get(name, {})
        version = max(claimed, default=0)
        for _ in range(1000):
            version += 1
            claim = _dumps({"by": f"{os.uname().nodename}:{os.getpid()}", "at": stamped["created"]})
            if self._put_new(f"{name}/{version}/{CLAIM_FILE}", claim):
                break
        else:
            raise RegistryError(f"adapter {name}@?: no free version number after 1000 attempts")
        body = {WEIGHTS_FILE: weights, PEFT_CONFIG_FILE: _dumps(config),
                PROVENANCE_FILE: _dumps({**stamped, "region": name, "version": version}), **extra}
        for fname, data in body.items():
            self._put(f"{name}/{version}/{fname}", data)
        manifest = {"format": MANIFEST_FORMAT, "region": name, "version": version, "created": stamped["created"],
                    "files": {f: {"sha256": _sha(d), "size": len(d)} for f, d in sorted(body.items())}}
        if not self._put_new(f"{name}/{version}/{MANIFEST_FILE}", _dumps(manifest)):
            raise RegistryError(f"adapter {name}@{version}: a manifest appeared under a number this publisher "
                                f"claimed; the store does not honour create-only writes")
        info = self.resolve(name, version)
        log.info("saved adapter %s (%d x %d) at %s/%s/%d", info.ref, n, dim, self.url, name, version)
        return info

    def remove(self, region: str, version: int | None = None) -> list[AdapterInfo]:
        """Delete the manifest first (the version disappears whole), then its files; the claim stays, so the number
        is never reused. Versions whose manifest is broken are removed too (reported with empty metadata)."""
        _check_version(version)
        _check_region(region)
        listing = self._listing()
        name = self._region_name(region, listing)
        if name is None:
            raise self._not_found(f"no adapter for region {region!r}")
        published = sorted(v for v, names in self._versions(listing)[name].items() if MANIFEST_FILE in names)
        if version is not None and version not in published:
            raise AdapterNotFound(f"adapter {name}@{version} not found; versions: {published}", self.regions())
        if not published:
            raise self._not_found(f"adapter {name} has no versions")
        removed = []
        for v in [version] if version is not None else published:
            try:
                info = self._read(name, v, listing)[0]
            except _Invalid:
                info = AdapterInfo(region=name, version=v, path=self.cache / name / str(v), base_model="",
                                   base_fingerprint="", num_virtual_tokens=0, token_dim=0, created="")
            self._call(self.fs.rm_file, self._key(name, str(v), MANIFEST_FILE))
            for rel in [r for r in listing if r.startswith(f"{name}/{v}/") and not r.endswith(f"/{CLAIM_FILE}")
                        and not r.endswith(f"/{MANIFEST_FILE}")]:
                self._call(self.fs.rm_file, self._key(rel))
            shutil.rmtree(self.cache / name / str(v), ignore_errors=True)
            log.info("removed adapter %s@%d from %s", name, v, self.url)
            removed.append(info)
        return removed
