"""A resolution cache shared by every API process: PostgreSQL, with an in-process layer."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Protocol

import psycopg
import psycopg_pool

from kiln.db.builds import QueueManager
from kiln.gomod.semver import is_semver

log = logging.getLogger(__name__)


class DatabaseResolutionCache:
    """Keep resolutions in kiln_resolutions (wall-clock stored_at) and in memory.

    Absolute versions never expire; queries (latest, branches, prefixes) carry an
    expires_at the janitor uses to delete them. A database fault degrades to memory only.
    """

    def __init__(self, queue: QueueManager, *, latest_ttl: float) -> None:
        self.queue = queue
        self.latest_ttl = latest_ttl
        self.memory = MemoryResolutionCache()

    def get(self, module: str, query: str) -> tuple[str, float] | None:
        """Return (version, stored_at) from memory, else from the database."""
        hit = self.memory.get(module, query)
        if hit is not None:
            return hit
        try:
            found = self.queue.get_resolution(module, query)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("resolution cache unavailable: %s", exc)
            return None
        if found is not None:
            self.memory.put(module, query, *found)
        return found

    def put(self, module: str, query: str, version: str, stored_at: float) -> None:
        """Store a resolution in memory and in the database."""
        self.memory.put(module, query, version, stored_at)
        ttl = None if is_semver(query) and query == version else self.latest_ttl
        try:
            self.queue.put_resolution(module, query, version, stored_at=stored_at, ttl=ttl)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("resolution cache unavailable: %s", exc)


CACHE_MAX_ENTRIES = 10_000


class ResolutionCache(Protocol):
    """Where resolved versions are kept; stored_at is a reading of the Resolver's clock."""

    def get(self, module: str, query: str) -> tuple[str, float] | None:
        """Return (version, stored_at) for a module and query, or None."""
        ...

    def put(self, module: str, query: str, version: str, stored_at: float) -> None:
        """Store the version a module and query resolved to."""
        ...


class MemoryResolutionCache:
    """A thread-safe in-process ResolutionCache that forgets its oldest entries past a bound."""

    def __init__(self, *, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def get(self, module: str, query: str) -> tuple[str, float] | None:
        """Return (version, stored_at) for a module and query, or None."""
        with self._lock:
            return self._data.get((module, query))

    def put(self, module: str, query: str, version: str, stored_at: float) -> None:
        """Store the version a module and query resolved to."""
        with self._lock:
            self._data[(module, query)] = (version, stored_at)
            self._data.move_to_end((module, query))
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
