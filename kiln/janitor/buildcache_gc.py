"""Collect the fleet build cache in the store (kiln/buildcache/): by age, then by size.

Objects older than ``max_age`` (by their last write) go first, then the oldest until the
cache holds at most ``max_bytes``. Deleting an output an entry still names is safe: the
worker that reads the entry finds no output, which is a miss, and go compiles again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kiln.artifacts.store import StorageError
from kiln.buildcache.blobs import BlobStore
from kiln.janitor.eviction import select_evictions

log = logging.getLogger(__name__)


@dataclass
class BuildCacheReport:
    """What one collection did."""

    expired: int = 0
    over_budget: int = 0
    freed_bytes: int = 0
    kept_bytes: int = 0

    def __str__(self) -> str:
        return (f"{self.expired} expired, {self.over_budget} over budget; freed "
                f"{self.freed_bytes / 1e6:.1f} MB, holds {self.kept_bytes / 1e6:.1f} MB")


class BuildCacheCollector:
    """Delete build cache objects past ``max_age`` seconds, then the oldest past ``max_bytes``."""

    def __init__(self, *, store: BlobStore, max_bytes: int, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        #: bytes the cache may hold; 0: no limit
        self.max_bytes = max_bytes
        #: seconds since an object's last write after which it goes; 0: no limit
        self.max_age = max_age
        self.clock = clock

    def collect(self) -> BuildCacheReport:
        """Run one collection; a store that fails ends it (the next one goes on)."""
        report = BuildCacheReport()
        try:
            blobs = list(self.store.blobs())
            chosen = select_evictions(blobs, when=lambda b: b.modified, size=lambda b: b.size,
                                      now=self.clock(), max_age=self.max_age,
                                      max_bytes=self.max_bytes)
            for blob in chosen.expired:
                self.store.delete(blob.path)
                report.expired += 1
                report.freed_bytes += blob.size
            for blob in chosen.over_budget:
                self.store.delete(blob.path)
                report.over_budget += 1
                report.freed_bytes += blob.size
            report.kept_bytes = chosen.kept_bytes
        except StorageError as exc:
            log.warning("buildcache_gc: %s", exc)
        if report.expired or report.over_budget:
            log.info("buildcache_gc: %s", report)
        return report
