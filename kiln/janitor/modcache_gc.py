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
        entries.sort(key=lambda e: e.stored)
        doomed = [e for e in entries if self.max_age and now - e.stored > self.max_age]
        kept = [e for e in entries if e not in doomed]
        total = sum(e.size for e in kept)
        while self.max_bytes and kept and total > self.max_bytes:
            oldest = kept.pop(0)
            total -= oldest.size
            doomed.append(oldest)
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
                     "(%d bytes) kept", len(doomed), freed, len(stale), len(kept), total)
        return {"deleted": len(doomed), "freed_bytes": freed, "leftovers": len(stale),
                "kept": len(kept), "kept_bytes": total}
