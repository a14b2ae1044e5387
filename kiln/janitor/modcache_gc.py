"""Collect the fleet module cache (``modcache/`` in the store) by age and size.

Entries older than ``modcache.max_age`` go first, then the oldest until the cache fits in
``modcache.max_bytes``. Module versions never change, so a collected entry costs only a fetch
from upstream the next time a build needs it. Files without a sidecar (a writer killed
between its two publications) are deleted once they are an hour old.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kiln.janitor.eviction import select_evictions
from kiln.modproxy.store import META_SUFFIX, ModuleStore

log = logging.getLogger(__name__)

#: a file without sidecar younger than this may be a write in progress
ORPHAN_GRACE_SECONDS = 3600.0


class ModuleCacheCollector:
    """Delete module cache entries past their age, then the oldest over the size budget."""

    def __init__(self, *, store: ModuleStore, max_bytes: int, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock

    def collect(self) -> dict[str, int]:
        """Collect once; return how many entries and bytes were deleted and are kept."""
        now = self.clock()
        entries, orphans = self.store.entries()
        chosen = select_evictions(entries, when=lambda e: e.stored, size=lambda e: e.size,
                                  now=now, max_age=self.max_age, max_bytes=self.max_bytes)
        doomed = chosen.expired + chosen.over_budget
        freed = 0
        for entry in doomed:
            # the sidecar first: from then on the entry is a miss, never half there
            self.store.delete_key(entry.path + META_SUFFIX)
            self.store.delete_key(entry.path)
            freed += entry.size
        stale = [key for key, modified in orphans if now - modified > ORPHAN_GRACE_SECONDS]
        for key in stale:
            self.store.delete_key(key)
        if doomed or stale:
            log.info("module cache: deleted %d entries (%d bytes) and %d leftovers; %d entries "
                     "(%d bytes) kept", len(doomed), freed, len(stale), len(chosen.kept),
                     chosen.kept_bytes)
        return {"deleted": len(doomed), "freed_bytes": freed, "leftovers": len(stale),
                "kept": len(chosen.kept), "kept_bytes": chosen.kept_bytes}
