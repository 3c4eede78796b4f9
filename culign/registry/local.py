"""The registry in a local folder: ``<root>/<REGION>/<version>/``, one immutable folder per version.

A version is written into a dot-folder and renamed into place, so readers only ever see complete versions and a
killed save leaves nothing but a dot-folder behind (swept once it is an hour old). Removal renames a version out
of the way first, for the same reason. ``<REGION>/.last-version`` remembers the highest number ever published,
so the number of a removed version is never given to other content.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .base import MAX_PUBLISH_ATTEMPTS, BaseRegistry, Catalog
from .format import (PEFT_CONFIG_FILE, PROVENANCE_FILE, REGION_NAME_RE, TMP_PREFIX, VERSION_DIR_RE, WEIGHTS_FILE,
                     AdapterInfo, InvalidEntry, NewVersion, RegistryError, dump_json, read_info)

log = logging.getLogger("culign.registry")

TRASH_PREFIX = ".trash-"
HIGH_WATER_FILE = ".last-version"  # highest version ever published in a region, so numbers are never reused
STALE_AFTER_S = 3600.0
PAUSE_ENV = "CULIGN_REGISTRY_TEST_PAUSE_S"  # test hook: sleep before each rename, so a test can kill a save there


class LocalRegistry(BaseRegistry):
    """Soft prompts per region and version under one root folder. Holds no state besides the root, so any
    number of LocalRegistry objects and processes can share a root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def _outside_root(self, path: Path, ref: str) -> str | None:
        """Why ``path`` may not be used, or None. Names are validated already; this catches symlinks that lead
        out of the root (defence in depth)."""
        if path.resolve().is_relative_to(self.root.resolve()):
            return None
        return f"adapter {ref}: {path} resolves outside the registry root {self.root}"

    def _inside_root(self, path: Path, ref: str) -> Path:
        if why := self._outside_root(path, ref):
            raise RegistryError(why)
        return path

    def _path(self, region: str, version: int) -> Path:
        return self.root / region / str(version)

    def _existing_region(self, catalog: Catalog, region: str) -> str:
        name = super()._existing_region(catalog, region)
        self._inside_root(self.root / name, region)
        return name

    # ------------------------------------------------------------------ primitives
    def _list(self) -> Catalog:
        try:
            region_dirs = sorted(p for p in self.root.iterdir() if REGION_NAME_RE.fullmatch(p.name) and p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            region_dirs = []
        return Catalog({d.name: _versions_on_disk(d) for d in region_dirs})

    def _read(self, catalog: Catalog, region: str, version: int) -> tuple[AdapterInfo, dict]:
        path = self._path(region, version)
        if why := self._outside_root(path, f"{region}@{version}"):
            raise InvalidEntry(why, "unsafe")
        return read_info(region, version, path)

    def _publish(self, catalog: Catalog, region: str, new: NewVersion) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        region_dir = self.root / region
        region_dir.mkdir(exist_ok=True)
        self._inside_root(region_dir, region)
        _sweep_stale(region_dir)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=region_dir))
        try:
            _write_durably(tmp / WEIGHTS_FILE, new.weights)
            _write_durably(tmp / PEFT_CONFIG_FILE, dump_json(new.config))
            for name, data in new.extra.items():
                _write_durably(tmp / name, data)
            return _rename_into_place(tmp, region_dir, new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _delete(self, catalog: Catalog, region: str, version: int) -> None:
        region_dir = self.root / region
        path = self._inside_root(self._path(region, version), f"{region}@{version}")
        _raise_high_water(region_dir, version)  # also covers versions not published by save (copied in)
        trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{version}-", dir=region_dir))
        os.rename(path, trash / "v")  # atomic: the version disappears whole; the rmtree below may take its time
        _fsync_dir(region_dir)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- publishing
def _rename_into_place(tmp: Path, region_dir: Path, new: NewVersion) -> int:
    """Rename the finished temp folder to the next free version, stamping that version into culign.json.

    A concurrent writer may take the number between our look and our rename: the rename then fails
    (the target is a non-empty folder) and we try the next number. Existing versions are never replaced,
    and numbers of removed versions are not reused.
    """
    version = 0
    for _ in range(MAX_PUBLISH_ATTEMPTS):
        # Past the last number tried too: a stray file or empty folder under that name must not stall us.
        version = max(max(_versions_on_disk(region_dir), default=0), _high_water(region_dir), version) + 1
        target = region_dir / str(version)
        _write_durably(tmp / PROVENANCE_FILE, new.provenance_file(region_dir.name, version), replace=True)
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
        return version
    raise RegistryError(f"adapter {region_dir.name}@?: no free version number after {MAX_PUBLISH_ATTEMPTS} attempts")


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


# ---------------------------------------------------------------------------------------------------- numbering
def _versions_on_disk(region_dir: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in region_dir.iterdir() if VERSION_DIR_RE.fullmatch(p.name) and p.is_dir())
    except FileNotFoundError:
        return []


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
