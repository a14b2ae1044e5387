"""The worker's side of the fleet build cache: a local disk cache backed by the shared store.

The go command of a compile step asks its GOCACHEPROG program (worker_image/cacheprog),
which asks the worker through a socket (kiln/buildcache/server.py) and gets its answers
from here. Entries are Go's own: an action id names an output id and size; an output id is
the SHA-256 of the output's bytes.

* get: the local disk (``<dir>/a/<action id>`` and ``<dir>/o/<output id>``), then the shared
  store (kiln/buildcache/blobs.py). What comes from the store is checked (the entry is well
  formed, the output has its size and hashes to its id) before it is written locally; a
  bad one is a miss, never handed to go.
* put: the output is hashed as it arrives and written locally, and the entry is staged for
  its build (``BuildSession``).
* publish: only when the build succeeded, its staged entries go to the store (each output
  before the entry naming it); a failed or cancelled build's are discarded. With them goes
  the build's manifest (``m/<build key>``): every action its compile got or put.
* prefetch: a worker about to build a key whose manifest the store has fetches those
  entries onto its disk, several at a time, while the fetch phase runs; go's gets then
  find them locally instead of waiting for the store one at a time.

A store that fails is left alone for STORE_RETRY_SECONDS: the build goes on with the local
cache only, and never fails because the cache is down. The program's outputs directory is
``<dir>/o``, which the docker sandbox mounts read-only: a step reads the cache, and writes
it only through the worker, which checks what it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kiln.artifacts.store import CHUNK_BYTES, StorageError
from kiln.buildcache.blobs import BlobStore

log = logging.getLogger(__name__)

#: seconds a failing store is left alone before it is tried again
STORE_RETRY_SECONDS = 60.0
#: the largest output accepted (a package archive or a linked binary)
MAX_OBJECT_BYTES = 1024 * 1024 * 1024
#: Go's action and output ids: SHA-256, in hex
ID = re.compile(r"^[0-9a-f]{64}$")
#: entries a prefetch fetches at once (the store's latency, not the CPU, is what it hides)
PREFETCH_THREADS = 8
#: the most actions a manifest may name (a real Caddy's compile uses ~2,500)
MAX_MANIFEST_ACTIONS = 100_000
#: a local hit refreshes the mtimes of its files once they are this old, seconds: the worker
#: trims its disk least recently used first by them (kiln/worker/trim.py)
FRESHEN_SECONDS = 3600.0


class Counters(Protocol):
    """Where the cache counts what it does (kiln/metrics.py's MetricsRecorder)."""

    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None:
        """Add ``amount`` to a counter."""
        ...


class Body(Protocol):
    """The bytes of a put, read as they arrive (the socket's stream)."""

    def read(self, size: int, /) -> bytes:
        """Return at most ``size`` bytes; b"" at the end."""
        ...


class CacheRefused(ValueError):
    """A put the worker does not store: malformed ids, too large, or bytes that do not
    hash to their output id."""


@dataclass(frozen=True)
class Entry:
    """What Go gets for an action: its output's id and size."""

    output: str
    size: int

    def encode(self) -> bytes:
        return json.dumps({"output": self.output, "size": self.size}).encode()

    @staticmethod
    def decode(data: bytes) -> Entry | None:
        """Return the entry ``data`` holds, or None when it is not one."""
        try:
            value = json.loads(data)
            output, size = value["output"], value["size"]
        except (ValueError, TypeError, KeyError):
            return None
        if (not isinstance(output, str) or not ID.match(output) or type(size) is not int
                or not 0 <= size <= MAX_OBJECT_BYTES):
            return None
        return Entry(output, size)


class BuildCache:
    """A worker's build cache: its local directory and, if there is one, the shared store."""

    def __init__(self, *, directory: Path, store: BlobStore | None, program: Path,
                 socket_dir: Path, counters: Counters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory.resolve()
        self.store = store
        #: the GOCACHEPROG program the process sandbox runs (docker's is in its image)
        self.program = program
        self.socket_dir = socket_dir
        self.counters = counters
        self.clock = clock
        self.actions = self.directory / "a"
        self.outputs = self.directory / "o"
        self._tmp = self.directory / "tmp"
        for d in (self.actions, self.outputs, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # a predecessor killed while it wrote
            with contextlib.suppress(OSError):
                leftover.unlink()
        # the sandbox user reads the outputs through a read-only mount
        os.chmod(self.outputs, 0o755)
        os.chmod(self.directory, 0o755)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        #: what this worker's cache did since it started (for logs and tests)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._store_down_until = 0.0
        #: actions whose stored entry was bad: not fetched again by this worker
        self._rejected: set[str] = set()

    def prefetch(self, key: str) -> Prefetch | None:
        """Start fetching the entries build ``key``'s manifest names, if the store has one."""
        if not ID.match(key) or self._store_usable() is None:
            return None
        return Prefetch(self, key).start()

    def begin(self, key: str) -> BuildSession:
        """Start serving the compile of build ``key``; publish or discard it afterwards."""
        from kiln.buildcache.server import CacheServer

        session = BuildSession(self, key)
        session.server = CacheServer(session, self.socket_dir / f"{uuid.uuid4().hex[:16]}.sock")
        return session

    # counting -----------------------------------------------------------------------

    def _count(self, stat: str, metric: str, labels: Mapping[str, str],
               amount: float = 1.0) -> None:
        with self._lock:
            self.stats[stat] += int(amount)
        if self.counters is not None:
            self.counters.inc(metric, labels, amount)

    def _store_usable(self) -> BlobStore | None:
        if self.store is None or self.clock() < self._store_down_until:
            return None
        return self.store

    def _store_failed(self, operation: str, exc: Exception) -> None:
        self._store_down_until = self.clock() + STORE_RETRY_SECONDS
        self._count("store_errors", "kiln_buildcache_store_errors_total",
                    {"operation": operation})
        log.warning("build cache store unavailable, using the local cache only for %.0fs: %s",
                    STORE_RETRY_SECONDS, exc)

    # get ------------------------------------------------------------------------------

    def get(self, action: str) -> Entry | None:
        """Return the entry of ``action`` with its output on the local disk, or None."""
        if not ID.match(action):
            return None
        entry = self._local(action)
        if entry is not None:
            self._freshen(action, entry)
            self._count("local", "kiln_buildcache_gets_total", {"result": "local"})
            return entry
        entry = self._fetch(action)
        if entry is not None:
            self._count("store", "kiln_buildcache_gets_total", {"result": "store"})
            return entry
        self._count("miss", "kiln_buildcache_gets_total", {"result": "miss"})
        return None

    def _local(self, action: str) -> Entry | None:
        try:
            entry = Entry.decode((self.actions / action).read_bytes())
            if entry is None or (self.outputs / entry.output).stat().st_size != entry.size:
                return None
        except OSError:
            return None
        return entry

    def _freshen(self, action: str, entry: Entry) -> None:
        """Mark a local hit as used now (its mtimes), unless that was done in the last hour."""
        now = time.time()
        for path in (self.actions / action, self.outputs / entry.output):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > FRESHEN_SECONDS:
                    os.utime(path)

    def _fetch(self, action: str) -> Entry | None:
        store = self._store_usable()
        if store is None or action in self._rejected:
            return None
        tmp = self._tmp / uuid.uuid4().hex
        try:
            data = store.read(f"a/{action}")
            if data is None:
                return None
            entry = Entry.decode(data)
            if entry is None:
                self._reject("entry", action)
                return None
            if not (self.outputs / entry.output).is_file():
                if not store.download(f"o/{entry.output}", tmp):
                    return None
                reason = _check(tmp, entry)
                if reason:
                    self._reject(reason, action)
                    return None
                self._install(tmp, entry.output)
                self._count("fetched_bytes", "kiln_buildcache_bytes_total",
                            {"direction": "fetched"}, entry.size)
            self._write_entry(action, entry)
            return entry
        except StorageError as exc:
            self._store_failed("get", exc)
            return None
        except OSError as exc:  # the local disk: a miss, and go builds it
            log.warning("build cache: cannot keep %s locally: %s", action, exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _reject(self, reason: str, action: str) -> None:
        with self._lock:
            if len(self._rejected) < MAX_MANIFEST_ACTIONS:
                self._rejected.add(action)
        self._count("rejected", "kiln_buildcache_rejected_total", {"reason": reason})
        log.warning("build cache: the stored entry of action %s is bad (%s); ignored",
                    action, reason)

    # put ------------------------------------------------------------------------------

    def put(self, action: str, output: str, size: int, body: Body) -> Entry:
        """Read ``size`` bytes of ``body`` into the local cache as ``output``; keep the entry.

        Raise CacheRefused when the ids are malformed, the size is too large, or the bytes
        do not hash to ``output``; OSError when the body ends early or the disk fails.
        """
        if not ID.match(action) or not ID.match(output):
            raise CacheRefused("action and output ids are 64 lowercase hex digits")
        if not 0 <= size <= MAX_OBJECT_BYTES:
            raise CacheRefused(f"an output is at most {MAX_OBJECT_BYTES} bytes")
        tmp = self._tmp / uuid.uuid4().hex
        try:
            digest = hashlib.sha256()
            left = size
            with tmp.open("wb") as dst:
                while left:
                    chunk = body.read(min(left, CHUNK_BYTES))
                    if not chunk:
                        raise OSError(f"the body ended {left} bytes early")
                    digest.update(chunk)
                    dst.write(chunk)
                    left -= len(chunk)
            if digest.hexdigest() != output:
                raise CacheRefused("the body does not hash to its output id")
            entry = Entry(output, size)
            self._install(tmp, output)
            self._write_entry(action, entry)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._count("puts", "kiln_buildcache_puts_total", {})
        return entry

    def _install(self, tmp: Path, output: str) -> None:
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.outputs / output)

    def _write_entry(self, action: str, entry: Entry) -> None:
        tmp = self._tmp / uuid.uuid4().hex
        tmp.write_bytes(entry.encode())
        os.replace(tmp, self.actions / action)

    # publish --------------------------------------------------------------------------

    def publish(self, staged: Mapping[str, Entry], *, key: str = "",
                used: Collection[str] = ()) -> int:
        """Store the entries of a build that succeeded; return how many were stored.

        With ``key``, the build's manifest (the actions it put and ``used``) goes last.
        """
        store = self._store_usable()
        if store is None or not (staged or used):
            return 0
        published = 0
        try:
            for action, entry in staged.items():
                local = self.outputs / entry.output
                if _check(local, entry):
                    continue  # gone or changed locally: not worth sharing
                if not store.exists(f"o/{entry.output}"):
                    store.upload(f"o/{entry.output}", local)
                    self._count("published_bytes", "kiln_buildcache_bytes_total",
                                {"direction": "published"}, entry.size)
                # after its output: an entry in the store always names a stored output
                store.write(f"a/{action}", entry.encode())
                published += 1
            if ID.match(key):
                names = sorted(set(used) | set(staged))[:MAX_MANIFEST_ACTIONS]
                store.write(f"m/{key}", "\n".join(names).encode())
        except StorageError as exc:
            self._store_failed("publish", exc)
        self._count("published", "kiln_buildcache_published_total", {}, published)
        return published


def _check(path: Path, entry: Entry) -> str:
    """Return why the file at ``path`` is not ``entry``'s output ("size", "hash"), or ""."""
    try:
        if path.stat().st_size != entry.size:
            return "size"
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        return "size"
    return "" if digest.hexdigest() == entry.output else "hash"


class BuildSession:
    """The cache as one build's compile sees it: its socket, and the entries it put."""

    def __init__(self, cache: BuildCache, key: str) -> None:
        self.cache = cache
        self.key = key
        self.staged: dict[str, Entry] = {}
        self.used: set[str] = set()
        self._lock = threading.Lock()
        self._done = False
        self.server: CacheServerLike | None = None

    @property
    def socket(self) -> Path:
        assert self.server is not None
        return self.server.path

    def get(self, action: str) -> Entry | None:
        """Answer Go's get; what it found goes in the build's manifest."""
        entry = self.cache.get(action)
        if entry is not None:
            with self._lock:
                if not self._done:
                    self.used.add(action)
        return entry

    def put(self, action: str, output: str, size: int, body: Body) -> Entry:
        """Answer Go's put: keep the output locally and stage the entry for publishing."""
        entry = self.cache.put(action, output, size, body)
        with self._lock:
            if not self._done:
                self.staged[action] = entry
        return entry

    def stop(self) -> None:
        """Stop answering: the compile is over."""
        if self.server is not None:
            self.server.close()

    def publish(self) -> int:
        """The build succeeded: share what it put with the fleet; return how many entries."""
        self.stop()
        with self._lock:
            self._done, staged, used = True, dict(self.staged), set(self.used)
        count = self.cache.publish(staged, key=self.key, used=used)
        log.info("build cache: published %d of %d entries of build %s", count, len(staged),
                 self.key, extra={"build_key": self.key})
        return count

    def discard(self) -> None:
        """The build failed or was cancelled: share nothing of it."""
        self.stop()
        with self._lock:
            self._done = True
            self.staged.clear()
            self.used.clear()


class Prefetch:
    """Fetches the entries of a build's manifest onto the worker's disk, in the background."""

    def __init__(self, cache: BuildCache, key: str) -> None:
        self.cache = cache
        self.key = key
        self.fetched = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prefetch-{key[:12]}",
                                        daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Fetch no more (the compile is over, or the build failed)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        store = self.cache._store_usable()
        if store is None:
            return
        try:
            data = store.read(f"m/{self.key}")
        except StorageError as exc:
            self.cache._store_failed("prefetch", exc)
            return
        if data is None:
            return
        actions = [a for a in data.decode("ascii", "replace").split()[:MAX_MANIFEST_ACTIONS]
                   if ID.match(a)]
        with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch") as pool:
            fetched = sum(pool.map(self._one, actions))
        self.fetched = fetched
        self.cache._count("prefetched", "kiln_buildcache_prefetched_total", {}, fetched)
        log.info("build cache: prefetched %d of the %d entries build %s used before",
                 fetched, len(actions), self.key, extra={"build_key": self.key})

    def _one(self, action: str) -> bool:
        if self._stop.is_set() or self.cache._local(action) is not None:
            return False
        return self.cache._fetch(action) is not None


class CacheServerLike(Protocol):
    path: Path

    def close(self) -> None: ...
