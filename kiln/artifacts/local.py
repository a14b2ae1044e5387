"""The artifact store in a local or shared directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kiln.artifacts.store import (
    CHUNK_BYTES,
    StorageError,
    StoredArtifact,
    StoredObject,
    artifact_prefix,
    file_sha256,
)


@contextlib.contextmanager
def atomic_file(target: Path, tmp: Path) -> Iterator[BinaryIO]:
    """Open ``tmp`` to be written; once the block ends, fsync it and rename it to ``target``.

    Readers see the whole file or none: an error in the block, or a process killed in it,
    leaves ``target`` as it was (``tmp`` is removed, or left in its temporary directory for
    a clean-up). Errors of the file system are raised as OSError.
    """
    try:
        with tmp.open("wb") as dst:
            yield dst
            dst.flush()
            os.fsync(dst.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        # cleanup must not replace the error raised (the temporary directory may be the fault)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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
            with source.open("rb") as src, atomic_file(target, tmp) as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
                dst.flush()
                actual = file_sha256(tmp)
                if actual != sha256:
                    raise StorageError(f"checksum mismatch storing {path}: {actual} != {sha256}")
        except OSError as exc:
            raise StorageError(f"cannot store {path}: {exc}") from exc
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
