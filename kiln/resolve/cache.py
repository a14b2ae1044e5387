"""A resolution cache shared by every API process: PostgreSQL, with an in-process layer."""

from __future__ import annotations

import logging

import psycopg
import psycopg_pool

from kiln.db.builds import QueueManager
from kiln.request.spec import is_semver
from kiln.resolve.resolver import MemoryResolutionCache

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
