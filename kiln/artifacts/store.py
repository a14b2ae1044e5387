"""Artifact stores: where built binaries live. One interface, backends chosen by config."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK_BYTES = 1024 * 1024


class StorageError(Exception):
    """The store failed (I/O error, checksum mismatch): retryable."""


@dataclass(frozen=True)
class StoredArtifact:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredObject:
    path: str
    size: int


def artifact_prefix(key: str) -> str:
    """Return the content-addressed directory of a build's files."""
    return f"builds/{key[:2]}/{key}/"


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore(Protocol):
    """Stores build outputs under content-addressed paths."""

    def put(self, key: str, name: str, source: Path, *, sha256: str) -> StoredArtifact:
        """Upload ``source`` as ``name`` of build ``key``, verify it, then publish it."""
        ...

    def open(self, path: str) -> BinaryIO:
        """Open a published object for reading (seekable)."""
        ...

    def size(self, path: str) -> int | None:
        """Return the size of a published object, or None if it does not exist."""
        ...

    def url(self, path: str, *, filename: str) -> str | None:
        """Return a time-limited URL clients can download from, or None (stream instead)."""
        ...

    def delete(self, key: str) -> None:
        """Delete every object of build ``key``."""
        ...

    def objects(self) -> Iterator[StoredObject]:
        """Yield every published object."""
        ...

    def check(self) -> None:
        """Raise StorageError saying why the store cannot be used now, if it cannot."""
        ...


class LocalStore:
    """A directory on a local or shared file system."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def _file(self, path: str) -> Path:
        target = (self.root / path).resolve()
        if self.root not in target.parents:
            raise StorageError(f"{path!r} is outside the store")
        return target

    def put(self, key: str, name: str, source: Path, *, sha256: str) -> StoredArtifact:
        """Copy to a temporary name, verify the checksum, then rename into place."""
        path = artifact_prefix(key) + name
        target = self._file(path)
        tmp = self._tmp / f"{key}.{name}.{uuid.uuid4().hex}"
        try:
            with source.open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
                dst.flush()
                os.fsync(dst.fileno())
            actual = file_sha256(tmp)
            if actual != sha256:
                raise StorageError(f"checksum mismatch storing {path}: {actual} != {sha256}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store {path}: {exc}") from exc
        finally:
            # cleanup must not replace the StorageError (the staging directory may be the fault)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return StoredArtifact(path=path, size=target.stat().st_size, sha256=sha256)

    def open(self, path: str) -> BinaryIO:
        """Open a stored file for reading."""
        try:
            return self._file(path).open("rb")
        except FileNotFoundError as exc:
            raise StorageError(f"{path} is not in the store") from exc

    def size(self, path: str) -> int | None:
        """Return the file's size, or None."""
        try:
            return self._file(path).stat().st_size
        except FileNotFoundError:
            return None

    def url(self, path: str, *, filename: str) -> str | None:
        """Return None: a local store is streamed by the API."""
        return None

    def delete(self, key: str) -> None:
        """Remove the build's directory."""
        shutil.rmtree(self._file(artifact_prefix(key)), ignore_errors=True)

    def check(self) -> None:
        """Write and remove a probe file: the directory exists and can be written."""
        probe = self._tmp / f"check.{uuid.uuid4().hex}"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc}") from exc

    def objects(self) -> Iterator[StoredObject]:
        """Yield every stored file."""
        builds = self.root / "builds"
        if not builds.exists():
            return
        for dirpath, _dirs, files in os.walk(builds):
            for name in files:
                full = Path(dirpath) / name
                yield StoredObject(str(full.relative_to(self.root)), full.stat().st_size)


def make_store(config: object) -> ArtifactStore:
    """Return the store ``storage.backend`` names."""
    from kiln.config import StorageConfig

    assert isinstance(config, StorageConfig)
    if config.backend == "s3":
        from kiln.artifacts.s3 import S3Store

        return S3Store.from_config(config)
    return LocalStore(config.local.path)
