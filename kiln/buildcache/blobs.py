"""Where the fleet's build cache lives: the artifact store's directory or bucket, under
``buildcache/``.

Two kinds of object, both written whole under their final name (a directory store renames
a finished temporary file into place; an S3 PUT is atomic), so a killed writer leaves
nothing half-visible:

* ``buildcache/o/<output id>``: an output of the go command, whose name is the SHA-256 of
  its bytes (Go's output id);
* ``buildcache/a/<action id>``: ``{"output": "<output id>", "size": n}``, the answer to
  Go's "get" of that action. It is written after its output, and read as a claim that is
  checked: an output whose size or SHA-256 is not what the entry says is never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kiln.artifacts.local import atomic_file
from kiln.artifacts.store import CHUNK_BYTES, StorageError

#: the prefix of the build cache in the artifact store
PREFIX = "buildcache/"


@dataclass(frozen=True)
class Blob:
    """One stored object: its path under ``buildcache/``, size and last write (epoch s)."""

    path: str
    size: int
    modified: float


class BlobStore(Protocol):
    """Whole objects under ``buildcache/``; every failure is a StorageError."""

    def read(self, path: str) -> bytes | None:
        """Return a small object, or None when there is none."""
        ...

    def download(self, path: str, target: Path) -> bool:
        """Copy an object into ``target``; tell whether there was one."""
        ...

    def upload(self, path: str, source: Path) -> None:
        """Store ``source`` as ``path``, whole or not at all."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Store ``data`` as ``path``, whole or not at all."""
        ...

    def exists(self, path: str) -> bool:
        """Tell whether ``path`` is stored."""
        ...

    def blobs(self) -> Iterator[Blob]:
        """Yield every stored object."""
        ...

    def delete(self, path: str) -> None:
        """Remove ``path`` (nothing when it is gone already)."""
        ...


class DirectoryBlobs:
    """The build cache in ``<storage.local.path>/buildcache``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._tmp = self.root / ".tmp"

    def _file(self, path: str) -> Path:
        target = (self.root / path).resolve()
        if self.root not in target.parents:
            raise StorageError(f"{path!r} is outside the build cache")
        return target

    def read(self, path: str) -> bytes | None:
        """Return the file's bytes, or None."""
        try:
            return self._file(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {PREFIX}{path}: {exc}") from exc

    def download(self, path: str, target: Path) -> bool:
        """Copy the file to ``target``."""
        try:
            with self._file(path).open("rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot read {PREFIX}{path}: {exc}") from exc

    def upload(self, path: str, source: Path) -> None:
        """Copy to a temporary name, then rename into place."""
        self._place(path, lambda dst: _copy_into(source, dst))

    def write(self, path: str, data: bytes) -> None:
        """Write a temporary file, then rename it into place."""
        self._place(path, lambda dst: dst.write(data))

    def _place(self, path: str, fill: Any) -> None:
        target = self._file(path)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            with atomic_file(target, self._tmp / uuid.uuid4().hex) as dst:
                fill(dst)
        except OSError as exc:
            raise StorageError(f"cannot store {PREFIX}{path}: {exc}") from exc

    def exists(self, path: str) -> bool:
        """Tell whether the file is there."""
        try:
            return self._file(path).is_file()
        except OSError as exc:
            raise StorageError(f"cannot look at {PREFIX}{path}: {exc}") from exc

    def blobs(self) -> Iterator[Blob]:
        """Yield every file but the temporary ones."""
        for kind in ("a", "o", "m"):
            top = self.root / kind
            try:
                names = sorted(os.listdir(top))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot list {PREFIX}{kind}: {exc}") from exc
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    st = (top / name).stat()
                    yield Blob(f"{kind}/{name}", st.st_size, st.st_mtime)

    def delete(self, path: str) -> None:
        """Remove the file."""
        try:
            self._file(path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {PREFIX}{path}: {exc}") from exc


def _copy_into(source: Path, dst: Any) -> None:
    with source.open("rb") as src:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


class S3Blobs:
    """The build cache in the artifact bucket, under ``<storage.s3.prefix>buildcache/``."""

    def __init__(self, *, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix + PREFIX

    def _fail(self, what: str, path: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot {what} s3://{self.bucket}/{self.prefix}{path}: {exc}")

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def read(self, path: str) -> bytes | None:
        """Return the object's bytes, or None."""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + path)
            return bytes(reply["Body"].read())
        except Exception as exc:  # botocore's errors, and the network's
            if self._missing(exc):
                return None
            raise self._fail("read", path, exc) from exc

    def download(self, path: str, target: Path) -> bool:
        """Stream the object into ``target``."""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + path)
            with target.open("wb") as dst:
                for chunk in reply["Body"].iter_chunks(CHUNK_BYTES):
                    dst.write(chunk)
            return True
        except Exception as exc:
            if self._missing(exc):
                return False
            raise self._fail("read", path, exc) from exc

    def upload(self, path: str, source: Path) -> None:
        """PUT the file (whole: S3 never shows a partial PUT)."""
        try:
            with source.open("rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=body)
        except Exception as exc:
            raise self._fail("store", path, exc) from exc

    def write(self, path: str, data: bytes) -> None:
        """PUT the bytes."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=data)
        except Exception as exc:
            raise self._fail("store", path, exc) from exc

    def exists(self, path: str) -> bool:
        """HEAD the object."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + path)
            return True
        except Exception as exc:
            if self._missing(exc):
                return False
            raise self._fail("look at", path, exc) from exc

    def blobs(self) -> Iterator[Blob]:
        """List the prefix."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    yield Blob(item["Key"][len(self.prefix):], int(item["Size"]),
                               item["LastModified"].timestamp())
        except Exception as exc:
            raise self._fail("list", "", exc) from exc

    def delete(self, path: str) -> None:
        """DELETE the object."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + path)
        except Exception as exc:
            raise self._fail("delete", path, exc) from exc
