"""Module files in the artifact store, under ``modcache/``, each with a sidecar of its size and hash.

An entry is two objects: the file (``modcache/<escaped module>/@v/<escaped version>.zip``) and
its sidecar (the same key plus ``.meta``: JSON with ``size``, ``sha256`` and ``stored``, a unix
time). Each object is written to a temporary key and then published (a rename in a directory,
a server-side copy in S3), the file before its sidecar, and a reader trusts only a file whose
sidecar exists and whose bytes match it. So a writer killed at any point leaves either nothing
visible or a file without sidecar, which reads as a miss (and is overwritten by the next
writer, or collected); a file corrupted or truncated later is noticed on read, discarded and
fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from kiln.artifacts.local import LocalStore, atomic_file
from kiln.artifacts.s3 import NOT_FOUND_CODES, TMP_DIR, S3Store
from kiln.artifacts.store import ArtifactStore, StorageError
from kiln.errors import KilnError

PREFIX = "modcache/"
META_SUFFIX = ".meta"
_CHUNK = 1 << 20
#: held in memory up to this, spilled to a temporary file past it
SPOOL_BYTES = 8 << 20
_S3_ERRORS = (ClientError, BotoCoreError)


class CacheUnavailable(KilnError):
    """The store behind the module cache failed; the caller serves from upstream instead."""


@dataclass(frozen=True)
class Entry:
    """One published module file: its key (under ``modcache/``), size, hash and store time."""

    path: str
    size: int
    sha256: str
    stored: float


class Objects(Protocol):
    """Raw objects of one store: read, publish atomically, delete, list."""

    def read(self, key: str) -> IO[bytes] | None:
        """Open an object for reading, or return None if there is none."""
        ...

    def publish(self, key: str, source: IO[bytes]) -> None:
        """Write ``source`` to a temporary key, then make it visible as ``key`` at once."""
        ...

    def delete(self, key: str) -> None:
        """Delete an object (none is no error)."""
        ...

    def keys(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """Yield (key, size, modified time) of every object under ``prefix``."""
        ...


class DirectoryObjects:
    """Objects as files under a local store's directory; publication is a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp = self.root / ".tmp"

    def _file(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if self.root not in target.parents:
            raise CacheUnavailable(f"{key!r} is outside the store")
        return target

    def read(self, key: str) -> IO[bytes] | None:
        """Open the file, or None."""
        try:
            return self._file(key).open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {key}: {exc}") from exc

    def publish(self, key: str, source: IO[bytes]) -> None:
        """Copy to ``.tmp/``, fsync, then rename into place."""
        target = self._file(key)
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            with atomic_file(target, self.tmp / f"modcache.{uuid.uuid4().hex}") as dst:
                shutil.copyfileobj(source, dst, _CHUNK)
        except OSError as exc:
            raise CacheUnavailable(f"cannot store {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the file."""
        try:
            self._file(key).unlink(missing_ok=True)
        except OSError as exc:
            raise CacheUnavailable(f"cannot delete {key}: {exc}") from exc

    def keys(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """Walk the directory of ``prefix``."""
        base = self._file(prefix.rstrip("/"))
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = full.stat()
                    yield str(full.relative_to(self.root)), st.st_size, st.st_mtime


class S3Objects:
    """Objects in an S3 bucket; publication is a server-side copy of a ``.tmp/`` upload."""

    def __init__(self, *, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def read(self, key: str) -> IO[bytes] | None:
        """Fetch the object into a spooled file, or None."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            out = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115 - the caller closes it
            with contextlib.closing(body):
                for chunk in body.iter_chunks(_CHUNK):
                    out.write(chunk)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in NOT_FOUND_CODES:
                return None
            raise CacheUnavailable(f"cannot read {key}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise CacheUnavailable(f"cannot read {key}: {exc}") from exc
        out.seek(0)
        return out  # type: ignore[return-value]

    def publish(self, key: str, source: IO[bytes]) -> None:
        """Upload to ``.tmp/`` (which a lifecycle rule expires), then copy to ``key``."""
        tmp = f"{self.prefix}{TMP_DIR}{uuid.uuid4().hex}"
        try:
            self.client.upload_fileobj(source, self.bucket, tmp)
            self.client.copy_object(Bucket=self.bucket, Key=self.prefix + key,
                                    CopySource={"Bucket": self.bucket, "Key": tmp})
        except (*_S3_ERRORS, OSError) as exc:
            raise CacheUnavailable(f"cannot store {key}: {exc}") from exc
        finally:
            with contextlib.suppress(*_S3_ERRORS):
                self.client.delete_object(Bucket=self.bucket, Key=tmp)

    def delete(self, key: str) -> None:
        """Delete the object."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except _S3_ERRORS as exc:
            raise CacheUnavailable(f"cannot delete {key}: {exc}") from exc

    def keys(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """List the bucket under ``prefix``."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield (item["Key"][len(self.prefix):], int(item["Size"]),
                           item["LastModified"].timestamp())
        except _S3_ERRORS as exc:
            raise CacheUnavailable(f"cannot list {prefix}: {exc}") from exc


def objects_of(store: ArtifactStore) -> Objects:
    """Return the raw objects of a Kiln artifact store (a directory or an S3 bucket)."""
    if isinstance(store, LocalStore):
        return DirectoryObjects(store.root)
    if isinstance(store, S3Store):
        return S3Objects(client=store.client, bucket=store.bucket, prefix=store.prefix)
    raise StorageError(f"the module cache cannot use a {type(store).__name__}")


def _sha256_and_size(source: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    source.seek(0)
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    source.seek(0)
    return digest.hexdigest(), size


class ModuleStore:
    """Module files in the shared store, checked on every read."""

    def __init__(self, objects: Objects, *, clock: Callable[[], float] = time.time) -> None:
        self.objects = objects
        self.clock = clock

    def get(self, path: str, *, fresh_for: float | None = None) -> IO[bytes] | None:
        """Return a verified copy of a stored file, or None (a miss, or a bad entry deleted).

        With ``fresh_for``, an entry stored longer ago than that many seconds is a miss.
        Raises CacheUnavailable when the store cannot be read, Corrupt when the entry did
        not match its sidecar (it is then deleted).
        """
        stream = self.open(path, fresh_for=fresh_for)
        if stream is None:
            return None
        spooled = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115 - returned
        try:
            with contextlib.closing(stream):
                shutil.copyfileobj(stream, spooled, _CHUNK)  # type: ignore[misc]
                stream.finish()
        except BaseException:
            spooled.close()
            raise
        spooled.seek(0)
        return spooled  # type: ignore[return-value]

    def has(self, path: str) -> bool:
        """Tell whether an entry is published (its sidecar is there; its bytes are not read)."""
        meta = self.objects.read(PREFIX + path + META_SUFFIX)
        if meta is None:
            return False
        meta.close()
        return True

    def open(self, path: str, *, fresh_for: float | None = None) -> Checked | None:
        """Return a stored file as a stream checked against its sidecar as it is read.

        The caller reads it, then calls ``Checked.finish``, which raises Corrupt (and
        deletes the entry) when the bytes were not those recorded. None: a miss (or, with
        ``fresh_for``, an entry stored longer ago than that). Raises CacheUnavailable.
        """
        key = PREFIX + path
        meta = self.objects.read(key + META_SUFFIX)
        if meta is None:
            return None
        with meta:
            try:
                wanted = json.loads(meta.read())
                size, sha256 = int(wanted["size"]), str(wanted["sha256"])
                stored = float(wanted["stored"])
            except (ValueError, KeyError, TypeError):
                self.discard(path)
                return None
        if fresh_for is not None and self.clock() - stored > fresh_for:
            return None
        data = self.objects.read(key)
        if data is None:
            self.discard(path)
            return None
        return Checked(data, size=size, sha256=sha256, on_bad=lambda: self.discard(path),
                       path=path)

    def put(self, path: str, source: IO[bytes]) -> Entry:
        """Publish a file, then its sidecar; return what was recorded."""
        sha256, size = _sha256_and_size(source)
        key = PREFIX + path
        self.objects.publish(key, source)
        entry = Entry(path=key, size=size, sha256=sha256, stored=self.clock())
        meta = json.dumps({"size": size, "sha256": sha256, "stored": entry.stored}).encode()
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as side:
            side.write(meta)
            side.seek(0)
            self.objects.publish(key + META_SUFFIX, side)  # type: ignore[arg-type]
        return entry

    def discard(self, path: str) -> None:
        """Delete an entry: its sidecar first, so that it is a miss from then on."""
        key = PREFIX + path
        self.objects.delete(key + META_SUFFIX)
        self.objects.delete(key)

    def entries(self) -> tuple[list[Entry], list[tuple[str, float]]]:
        """Return the published entries, and the files without sidecar (key, modified time)."""
        files: dict[str, tuple[int, float]] = {}
        metas: set[str] = set()
        for key, size, modified in self.objects.keys(PREFIX):
            if key.endswith(META_SUFFIX):
                metas.add(key[:-len(META_SUFFIX)])
            else:
                files[key] = (size, modified)
        entries: list[Entry] = []
        for key in sorted(metas & files.keys()):
            meta = self.objects.read(key + META_SUFFIX)
            if meta is None:
                continue
            with meta:
                try:
                    wanted = json.loads(meta.read())
                    entries.append(Entry(path=key, size=int(wanted["size"]),
                                         sha256=str(wanted["sha256"]),
                                         stored=float(wanted["stored"])))
                except (ValueError, KeyError, TypeError):
                    entries.append(Entry(path=key, size=files[key][0], sha256="", stored=0.0))
        orphans = [(key, files[key][1]) for key in sorted(files.keys() - metas)]
        orphans += [(key + META_SUFFIX, 0.0) for key in sorted(metas - files.keys())]
        return entries, orphans

    def delete_key(self, key: str) -> None:
        """Delete one raw object under ``modcache/`` (a collected entry's part)."""
        if not key.startswith(PREFIX):
            raise CacheUnavailable(f"{key!r} is not a module cache object")
        self.objects.delete(key)


class Checked:
    """A stored file read as a stream, hashed on the way (ModuleStore.open)."""

    def __init__(self, raw: IO[bytes], *, size: int, sha256: str,
                 on_bad: Callable[[], None], path: str) -> None:
        self.raw = raw
        self.size = size
        self.sha256 = sha256
        self.path = path
        self._on_bad = on_bad
        self._digest = hashlib.sha256()
        self._read = 0

    def read(self, n: int = -1, /) -> bytes:
        """Read like a file; reading past the recorded size is a sign of corruption."""
        try:
            data = self.raw.read(n)
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {PREFIX}{self.path}: {exc}") from exc
        self._digest.update(data)
        self._read += len(data)
        return data

    def finish(self) -> None:
        """Read what is left and check the whole: raise Corrupt if it is not what was stored."""
        while self.read(_CHUNK):
            pass
        got = (self._read, self._digest.hexdigest())
        if got != (self.size, self.sha256):
            self._on_bad()
            raise Corrupt(self.path, f"{got[0]} bytes, sha256 {got[1]}; recorded {self.size} "
                                     f"bytes, sha256 {self.sha256}")

    def close(self) -> None:
        self.raw.close()


class Corrupt(KilnError):
    """A stored entry did not match its recorded size and hash; it was deleted."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"module cache entry {path} is corrupt ({detail}): discarded")
        self.path = path
