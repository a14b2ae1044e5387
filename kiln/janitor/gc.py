"""Storage GC and pruning: what the janitor deletes, and in which order.

An artifact is collected when it was not downloaded (or, never downloaded, not built) for
``retention`` seconds, and, while the store holds more than its byte budget, least recently
used first. Collecting deletes the build's objects and detaches them from the build, which
stays succeeded: the next request for it queues it again and a worker rebuilds the same
bytes. Each collection holds the build's row lock while it deletes, so a request for the
same build waits for it instead of racing a rebuild against the delete.

Each pass also repairs what the store and the database disagree on: objects no build holds
(an upload whose build then failed or was cancelled) are deleted, and a build whose
artifact vanished from the store (an operator, a bucket lifecycle rule) is detached so that
it is rebuilt instead of answering 503 for ever.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.artifacts.store import ArtifactStore, StorageError

if TYPE_CHECKING:
    from kiln.db.maintenance import Maintenance

log = logging.getLogger(__name__)

#: builds/<key[:2]>/<key>/<file>: the key of a stored object
KEY_IN_PATH = re.compile(r"(?:^|/)builds/[0-9a-f]{2}/([0-9a-f]{64})/")
#: expired builds fetched per query
RETENTION_PAGE = 500
#: states whose builds may be uploading right now
IN_FLIGHT = frozenset({"queued", "running"})


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@dataclass
class GcReport:
    """What one storage collection did."""

    expired: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    stored_bytes: int = 0

    def __str__(self) -> str:
        parts = [f"{len(self.expired)} expired", f"{len(self.over_budget)} over budget",
                 f"{len(self.orphans)} orphaned", f"{len(self.missing)} missing"]
        text = (", ".join(parts) + f"; freed {_mb(self.freed_bytes)}, "
                f"store holds {_mb(self.stored_bytes)}")
        if self.errors:
            text += f"; {len(self.errors)} error(s): {self.errors[0]}"
        return text

    def __bool__(self) -> bool:
        return bool(self.expired or self.over_budget or self.orphans or self.missing
                    or self.errors)


class StorageCollector:
    """Delete artifacts past their retention or over the store's budget."""

    def __init__(self, *, maintenance: Maintenance, store: ArtifactStore, retention: float,
                 budget_bytes: int, grace_seconds: float = 0.0) -> None:
        self.maintenance = maintenance
        self.store = store
        #: seconds since last use after which an artifact is collected; 0: never
        self.retention = retention
        #: bytes the store may hold; 0: no budget
        self.budget_bytes = budget_bytes
        #: artifacts used more recently than this are never collected (a held request may
        #: be about to stream a build that just finished)
        self.grace_seconds = grace_seconds

    def collect(self) -> GcReport:
        """Run one pass: retention, store/database repair, then the size budget."""
        report = GcReport()
        listed_at = self.maintenance.db_now()
        usage, paths = self._usage()
        if self.retention > 0:
            self._expire(usage, report)
        self._repair(usage, paths, listed_at, report)
        if self.budget_bytes > 0:
            self._enforce_budget(usage, report)
        report.stored_bytes = sum(usage.values())
        return report

    def _usage(self) -> tuple[dict[str, int], set[str]]:
        usage: dict[str, int] = defaultdict(int)
        paths: set[str] = set()
        for obj in self.store.objects():
            match = KEY_IN_PATH.search(obj.path)
            if match:
                usage[match.group(1)] += obj.size
                paths.add(obj.path)
        return usage, paths

    def _delete(self, key: str, usage: dict[str, int], report: GcReport) -> None:
        self.store.delete(key)
        report.freed_bytes += usage.pop(key, 0)

    def _expire(self, usage: dict[str, int], report: GcReport) -> None:
        older_than = max(self.retention, self.grace_seconds)
        while True:
            keys = self.maintenance.expired_artifacts(seconds=older_than, limit=RETENTION_PAGE)
            progress = False
            for key in keys:
                try:
                    with self.maintenance.locked_artifact(key, older_than=older_than) as ok:
                        if ok:
                            self._delete(key, usage, report)
                            report.expired.append(key)
                            progress = True
                except StorageError as exc:
                    report.errors.append(f"{key}: {exc}")
                    log.warning("cannot delete the artifact of %s: %s", key, exc,
                                extra={"build_key": key})
            if len(keys) < RETENTION_PAGE or not progress:
                return

    def _repair(self, usage: dict[str, int], paths: set[str], listed_at: object,
                report: GcReport) -> None:
        published = self.maintenance.published()
        for key in [k for k in usage if k not in published]:
            try:
                with self.maintenance.locked_build(key) as (row, _detach):
                    if row is not None and (row["state"] in IN_FLIGHT or
                                            (row["state"] == "succeeded" and
                                             row["artifact_path"])):
                        continue  # uploading now, or it finished after the listing
                    self._delete(key, usage, report)
                    report.orphans.append(key)
            except StorageError as exc:
                report.errors.append(f"{key}: {exc}")
        for key, (path, finished_at) in published.items():
            # objects are published before the build is marked succeeded: a build that
            # finished before the listing started must appear in it
            if path in paths or finished_at is None or finished_at >= listed_at:
                continue
            with self.maintenance.locked_build(key) as (row, detach):
                if (row is not None and row["state"] == "succeeded"
                        and row["artifact_path"] == path and self.store.size(path) is None):
                    detach()
                    report.missing.append(key)
                    log.warning("the artifact of %s is missing from the store; the next "
                                "request rebuilds it", key, extra={"build_key": key})

    def _enforce_budget(self, usage: dict[str, int], report: GcReport) -> None:
        total = sum(usage.values())
        if total <= self.budget_bytes:
            return
        for key in self.maintenance.artifacts_by_last_use():
            if total <= self.budget_bytes:
                return
            size = usage.get(key, 0)
            try:
                with self.maintenance.locked_artifact(key,
                                                      older_than=self.grace_seconds) as ok:
                    if ok:
                        self._delete(key, usage, report)
                        report.over_budget.append(key)
                        total -= size
            except StorageError as exc:
                report.errors.append(f"{key}: {exc}")
        if total > self.budget_bytes:
            log.warning("the store holds %s, over its budget of %s, but every artifact "
                        "left was used within the last %gs", _mb(total),
                        _mb(self.budget_bytes), self.grace_seconds)
