"""Artifact stores: where built binaries live. One interface, backends chosen by config."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from kiln.errors import KilnError

CHUNK_BYTES = 1024 * 1024


class StorageError(KilnError):
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
