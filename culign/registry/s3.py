"""The registry on object storage (``s3://bucket/prefix``, through fsspec): what every replica serves from.

An object store has no rename, so a version is published in three steps, each visible only as far as it is done:

1. **claim** the number: a create-only write (``If-None-Match: *``) of ``<REGION>/<v>/.claim``; a publisher that
   loses the race gets 412 and tries ``v + 1``, so two trainers never take the same number;
2. **upload** the version's files under ``<REGION>/<v>/`` (the same files as a local version folder);
3. **publish** ``<REGION>/<v>/manifest.json`` last, create-only, with each file's sha256 and size.

Readers list only versions with a manifest; every file must be there with the manifest's size and hash before a
version is used. A version's bytes are downloaded once into a local cache (verified against the manifest), and the
format's own checks (:func:`culign.registry.format.read_info`) then run on that folder, so an object-store version
passes exactly the checks a local one does. Removing deletes the manifest first (the version disappears whole),
then the files; the claim stays, so a number is never given to other content (servers cache by REGION@version).

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
from pathlib import Path

from .base import MAX_PUBLISH_ATTEMPTS, BaseRegistry, Catalog
from .format import (PEFT_CONFIG_FILE, PROVENANCE_FILE, REGION_NAME_RE, TMP_PREFIX, VERSION_DIR_RE, WEIGHTS_FILE,
                     AdapterInfo, InvalidEntry, LoadedAdapter, NewVersion, RegistryError, RegistryUnavailable,
                     check_region, check_version, checked_load, dump_json, read_info)

log = logging.getLogger("culign.registry")

MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
MANIFEST_FORMAT = 1
ETAG_STAMP = ".manifest-etag"  # in a cached version folder: the manifest it was verified against
URL_RE = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<bucket>[^/]*)(?:/(?P<prefix>.*))?$")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix without outer slashes) of a store URL; ValueError saying what is wrong with it."""
    m = URL_RE.match(url)
    if not m or not m["bucket"]:
        raise ValueError(f"invalid registry URL {url!r}: use s3://BUCKET[/PREFIX]")
    if not BUCKET_RE.fullmatch(m["bucket"]):
        raise ValueError(f"invalid bucket {m['bucket']!r} in {url!r}: 3-63 lower-case letters, digits, '.', '-'")
    return m["scheme"], m["bucket"], (m["prefix"] or "").strip("/")


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


def _numbered(objects: dict[str, dict]) -> dict[str, dict[int, set[str]]]:
    """region -> version -> the file names there (claims and manifests included)."""
    out: dict[str, dict[int, set[str]]] = {}
    for rel in objects:
        parts = rel.split("/")
        if len(parts) == 3 and REGION_NAME_RE.fullmatch(parts[0]) and VERSION_DIR_RE.fullmatch(parts[1]):
            out.setdefault(parts[0], {}).setdefault(int(parts[1]), set()).add(parts[2])
    return out


class StoreCatalog(Catalog):
    """The versions with a manifest, and the listing they were found in (whose sizes and ETags check downloads)."""

    def __init__(self, objects: dict[str, dict]):
        super().__init__({region: sorted(v for v, names in versions.items() if MANIFEST_FILE in names)
                          for region, versions in _numbered(objects).items()})
        self.objects = objects  # key relative to the prefix -> {size, etag}


class S3Registry(BaseRegistry):
    """The registry over an fsspec URL. Stateless but for the local cache of verified downloads (under
    ``cache_dir``, one folder per URL), so any number of processes and machines can share a store."""

    def __init__(self, url: str, cache_dir: str | Path, fs=None):
        self.scheme, self.bucket, prefix = split_url(url)
        self.url = url.rstrip("/")
        self.base = f"{self.bucket}/{prefix}".rstrip("/")
        self.root = self.url  # what messages and listings print
        self._fs = fs
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

    # ------------------------------------------------------------------ primitives
    def _path(self, region: str, version: int) -> Path:
        return self.cache / region / str(version)

    def _where(self, region: str, version: int) -> str:
        return self.url  # with the REGION@version every message names, that is the version's place

    def _list(self) -> StoreCatalog:
        """Raises RegistryUnavailable when the store cannot be listed. A version without a manifest is not a
        version yet (being uploaded, or its publisher died): not listed, not warned about."""
        return StoreCatalog(self._listing())

    def _read(self, catalog: StoreCatalog, region: str, version: int) -> tuple[AdapterInfo, dict]:
        return read_info(region, version, self._fetch(region, version, catalog.objects))

    def _fetch(self, region: str, version: int, objects: dict[str, dict]) -> Path:
        """The version's files in the local cache, each checked against the manifest (downloaded once per manifest
        ETag); raises InvalidEntry naming what is wrong."""
        rel = f"{region}/{version}"
        etag = objects[f"{rel}/{MANIFEST_FILE}"]["etag"]
        local = self._path(region, version)
        stamp = local / ETAG_STAMP
        if stamp.exists() and stamp.read_text() == etag:
            return local
        try:
            manifest = json.loads(self._get(f"{rel}/{MANIFEST_FILE}"))
        except FileNotFoundError:
            raise InvalidEntry(f"{MANIFEST_FILE} vanished while reading", "incomplete") from None
        except ValueError as e:
            raise InvalidEntry(f"{MANIFEST_FILE} is not JSON: {e}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or manifest.get("region") != region or manifest.get("version") != version:
            raise InvalidEntry(f"{MANIFEST_FILE} does not describe {region}@{version}", "copy"
                               if isinstance(files, dict) else "corrupt")
        for name in (WEIGHTS_FILE, PEFT_CONFIG_FILE, PROVENANCE_FILE):
            if name not in files:
                raise InvalidEntry(f"{MANIFEST_FILE} lists no {name}")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.cache))
        try:
            for name, meta in files.items():
                if not isinstance(meta, dict) or "/" in name or name.startswith("."):
                    raise InvalidEntry(f"{MANIFEST_FILE} entry {name!r} is malformed")
                there = objects.get(f"{rel}/{name}")
                if there is None:
                    raise InvalidEntry(f"{name} is missing (half-uploaded?)", "incomplete")
                if there["size"] != meta.get("size"):
                    raise InvalidEntry(f"{name} is {there['size']} bytes, the manifest says {meta.get('size')} "
                                       f"(half-uploaded or replaced)", "incomplete")
                try:
                    data = self._get(f"{rel}/{name}")
                except FileNotFoundError:
                    raise InvalidEntry(f"{name} vanished while reading", "incomplete") from None
                if _sha(data) != meta.get("sha256"):
                    raise InvalidEntry(f"{name} sha256 {_sha(data)[:16]}... does not match the manifest "
                                       f"{str(meta.get('sha256'))[:16]}...")
                (tmp / name).write_bytes(data)
            (tmp / ETAG_STAMP).write_text(etag)
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

    def _publish(self, catalog: StoreCatalog, region: str, new: NewVersion) -> int:
        """Claim a number (create-only), upload the files, write the manifest last (create-only)."""
        claim = dump_json({"by": f"{os.uname().nodename}:{os.getpid()}", "at": new.stamped["created"]})
        version = max(_numbered(catalog.objects).get(region, {}), default=0)  # claimed ones too, manifest or not
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            version += 1
            if self._put_new(f"{region}/{version}/{CLAIM_FILE}", claim):
                break
        else:
            raise RegistryError(f"adapter {region}@?: no free version number after {MAX_PUBLISH_ATTEMPTS} attempts")
        body = new.files(region, version)
        for name, data in body.items():
            self._put(f"{region}/{version}/{name}", data)
        manifest = {"format": MANIFEST_FORMAT, "region": region, "version": version,
                    "created": new.stamped["created"],
                    "files": {f: {"sha256": _sha(d), "size": len(d)} for f, d in sorted(body.items())}}
        if not self._put_new(f"{region}/{version}/{MANIFEST_FILE}", dump_json(manifest)):
            raise RegistryError(f"adapter {region}@{version}: a manifest appeared under a number this publisher "
                                f"claimed; the store does not honour create-only writes")
        return version

    def _delete(self, catalog: StoreCatalog, region: str, version: int) -> None:
        """The manifest first (the version disappears whole), then the files; the claim stays."""
        folder = f"{region}/{version}/"
        self._call(self.fs.rm_file, self._key(folder + MANIFEST_FILE))
        for rel in catalog.objects:
            if rel.startswith(folder) and not rel.endswith((f"/{CLAIM_FILE}", f"/{MANIFEST_FILE}")):
                self._call(self.fs.rm_file, self._key(rel))
        shutil.rmtree(self._path(region, version), ignore_errors=True)

    # ------------------------------------------------------------------ when the store is away, and when it is not
    def load(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
             base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter:
        """As :meth:`BaseRegistry.load`; while the store is unreachable, a version verified earlier is loaded from
        the local cache."""
        try:
            return super().load(region, version, hidden_size=hidden_size, base_fingerprint=base_fingerprint,
                                allow_base_mismatch=allow_base_mismatch)
        except RegistryUnavailable:
            cached = self._cached(region, version)
            if cached is None:
                raise
        log.warning("registry %s unreachable: loading %s from the verified local copy", self.url, cached[0].ref)
        return checked_load(*cached, hidden_size, base_fingerprint, allow_base_mismatch)

    def _cached(self, region: str, version: int | None) -> tuple[AdapterInfo, dict] | None:
        """A version verified earlier, from the local cache alone."""
        dirs = [d for d in self.cache.iterdir() if d.name.casefold() == region.casefold()] \
            if self.cache.exists() else []
        for d in dirs:
            have = sorted((int(p.name) for p in d.iterdir() if VERSION_DIR_RE.fullmatch(p.name)
                           and (p / ETAG_STAMP).exists()), reverse=True)
            for v in have if version is None else [version] if version in have else []:
                try:
                    return read_info(d.name, v, d / str(v))
                except InvalidEntry:
                    continue
        return None

    def verify(self, region: str, version: int | None = None, *, hidden_size: int | None = None,
               base_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> list[str]:
        """As :meth:`BaseRegistry.verify`, with a named version's bytes downloaded afresh (the local cache is not
        trusted for this)."""
        check_version(version)
        check_region(region)  # before a path is built from it
        if version is not None:
            shutil.rmtree(self._path(region, version), ignore_errors=True)
        return super().verify(region, version, hidden_size=hidden_size, base_fingerprint=base_fingerprint,
                              allow_base_mismatch=allow_base_mismatch)
