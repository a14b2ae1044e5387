"""The queue manager: every query Kiln runs on builds, attempts and workers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries

#: ends the lines of builds.sql's claim that keep a worker to its toolchain
TOOLCHAIN_MARK = "-- toolchain"
#: builds fail_unclaimable fails per statement (the next run takes the rest)
UNCLAIMABLE_BATCH = 1000

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Claimed:
    """A build a worker now holds."""

    key: str
    spec: dict[str, Any]
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class Build:
    """One row of kiln_builds, as get_build reads it (every column; migrations/0001)."""

    key: str
    spec: dict[str, Any]
    state: str
    priority: int
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_expires_at: dt.datetime | None
    run_after: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    error_kind: str | None
    artifact_path: str | None
    artifact_size: int | None
    artifact_sha256: str | None
    downloads: int
    last_downloaded_at: dt.datetime | None
    requested_by: str | None

    def stored_artifact(self) -> tuple[str, int, str] | None:
        """Return (path, size, sha256) of the published artifact, or None if there is none."""
        if self.artifact_path is None or self.artifact_size is None \
                or self.artifact_sha256 is None:
            return None
        return self.artifact_path, self.artifact_size, self.artifact_sha256

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Build:
        """Make a Build of a row with at least kiln_builds' columns (extra ones are dropped)."""
        return cls(**{name: row[name] for name in _BUILD_FIELDS})


_BUILD_FIELDS = tuple(Build.__dataclass_fields__)


@dataclass(frozen=True)
class EnqueueResult:
    build: Build
    #: true when this call put the build on the queue (a new key, or a requeue)
    queued: bool


class QueueManager:
    """All access to kiln_builds, kiln_attempts, kiln_workers and kiln_resolutions."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def _one(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return cur.fetchone()

    def _all(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self._rows(queries()[name], params)

    def _rows(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    # builds -------------------------------------------------------------------------

    def enqueue(self, key: str, spec: dict[str, Any], *, priority: int = 0,
                max_attempts: int = 3, requested_by: str | None = None,
                admit: Callable[[psycopg.Cursor[Any]], None] | None = None) -> EnqueueResult:
        """Queue a build once per key; NOTIFY workers in the same transaction.

        ``admit`` runs in that transaction when the call would queue the build; raising
        from it undoes the insert (quotas are enforced this way).
        """
        existing = self.get(key)
        if existing is not None and existing.state == "queued" and existing.priority < priority:
            # whoever asks for a queued build lifts it to their priority: a user joining a
            # prebuild (kiln/janitor/prebuild.py) must not wait behind every other build
            raised = self._one("raise_priority", {"key": key, "priority": priority})
            if raised is not None:
                existing = Build.from_row(raised)
        if existing is not None and _enqueue_keeps(existing):
            # a cached, queued or running build (the common case) is answered by one read:
            # the insert would lock the row, wait for whoever holds it (a download being
            # counted) and make its commit wait for a WAL flush (bench/: download lookup)
            return EnqueueResult(build=existing, queued=False)
        with self._conn() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()["enqueue"], {
                "key": key, "spec": Jsonb(spec), "priority": priority,
                "max_attempts": max_attempts, "requested_by": requested_by,
            })
            queued = cur.fetchone() is not None
            if queued and admit is not None:
                admit(cur)
            if queued:
                cur.execute(queries()["notify_queued"], {"key": key})
            cur.execute(queries()["get_build"], {"key": key})
            build = cur.fetchone()
        assert build is not None
        return EnqueueResult(build=Build.from_row(build), queued=queued)

    def get(self, key: str) -> Build | None:
        """Return a build, or None."""
        row = self._one("get_build", {"key": key})
        return Build.from_row(row) if row is not None else None

    def queue_position(self, key: str) -> int:
        """Return how many queued builds will be claimed before this one."""
        row = self._one("queue_position", {"key": key})
        return int(row["count"]) if row else 0

    def list_builds(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """Return the most recent builds."""
        return self._all("list_builds", {"limit": limit})

    def admin_list_builds(self, *, limit: int = 50, state: str | None = None,
                          requested_by: str | None = None,
                          before: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Return recent builds with who asked for them, newest first, optionally filtered."""
        return self._all("admin_list_builds", {"limit": limit, "state": state,
                                               "requested_by": requested_by,
                                               "before": before})

    def cancel(self, key: str, *, reason: str) -> dict[str, Any] | None:
        """Cancel a queued or running build; NOTIFY its worker. None if neither."""
        return self._one("cancel", {"key": key, "reason": reason})

    def force_rebuild(self, key: str) -> bool:
        """Queue a finished build again, whatever its outcome; False if it is not finished."""
        return self._one("force_rebuild", {"key": key}) is not None

    def forget_artifact(self, key: str) -> bool:
        """Detach a succeeded build from its artifact (the next request rebuilds it)."""
        return self._one("forget_artifact", {"key": key}) is not None

    def attempts(self, key: str) -> list[dict[str, Any]]:
        """Return every attempt of a build, oldest first."""
        return self._all("attempts", {"key": key})

    def popular_builds(self, *, sandbox: str, go_version: str, window: float,
                       limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Return the key and spec of the most downloaded recent builds of a toolchain."""
        rows = self._all("popular_builds", {"sandbox": sandbox, "go_version": go_version,
                                            "window": window, "limit": limit})
        return [(row["key"], row["spec"]) for row in rows]

    def record_download(self, key: str) -> None:
        """Count a download and remember when it happened (for storage GC)."""
        self._one_exec("record_download", {"key": key})

    def _one_exec(self, name: str, params: dict[str, Any]) -> None:
        with self._conn() as conn:
            conn.execute(queries()[name], params)

    # claiming and finishing ---------------------------------------------------------

    def claim(self, worker_id: str, *, limit: int, lease_seconds: float,
              sandbox: str | None = None, go_version: str | None = None) -> list[Claimed]:
        """Claim up to ``limit`` queued builds for ``worker_id`` with a lease.

        A worker passes its sandbox identity and Go version and gets only builds keyed with
        them: what it builds is then what the key and the provenance say. Neither claims
        builds of any toolchain (tools and tests that build nothing).
        """
        if (sandbox is None) != (go_version is None):
            raise ValueError("claim: give both sandbox and go_version, or neither")
        params = {"worker_id": worker_id, "limit": limit, "lease_seconds": lease_seconds,
                  "sandbox": sandbox, "go_version": go_version}
        rows = self._rows(queries()["claim"] if sandbox is not None else _claim_any(), params)
        return [Claimed(r["key"], r["spec"], r["number"], r["max_attempts"]) for r in rows]

    def extend_leases(self, worker_id: str, keys: list[str], *,
                      lease_seconds: float) -> set[str]:
        """Extend the leases of ``keys``; return the keys this worker still holds."""
        if not keys:
            return set()
        rows = self._all("extend_leases", {"worker_id": worker_id, "keys": keys,
                                           "lease_seconds": lease_seconds})
        return {r["key"] for r in rows}

    def complete(self, key: str, worker_id: str, *, artifact_path: str, artifact_size: int,
                 artifact_sha256: str, attempt: int | None = None) -> bool:
        """Mark a build succeeded; False if this worker no longer held it.

        With ``attempt``, only while that attempt is the one running: a worker that lost a
        build and claimed it again cannot finish the new attempt with the old one's result.
        """
        row = self._one("complete", {"key": key, "worker_id": worker_id, "attempt": attempt,
                                     "artifact_path": artifact_path,
                                     "artifact_size": artifact_size,
                                     "artifact_sha256": artifact_sha256})
        return row is not None

    def fail(self, key: str, worker_id: str, *, error: str, retryable: bool,
             retry_after: float = 0.0, attempt: int | None = None) -> str | None:
        """Record a failure; return the new state (queued when it will be retried).

        With ``attempt``, only while that attempt is the one running (see complete).
        """
        row = self._one("fail", {"key": key, "worker_id": worker_id, "attempt": attempt,
                                 "error": error,
                                 "retryable": retryable, "retry_after": retry_after})
        return row["state"] if row else None

    def release(self, key: str, worker_id: str, *, outcome: str = "preempted",
                spend: bool = False, attempt: int | None = None) -> bool:
        """Hand a running build back to the queue at once (with ``attempt``: see complete)."""
        row = self._one("release", {"key": key, "worker_id": worker_id, "attempt": attempt,
                                    "outcome": outcome,
                                    "spend": spend})
        return row is not None

    def requeue_expired(self) -> list[dict[str, Any]]:
        """Requeue (or fail, past max_attempts) running builds whose lease expired."""
        return self._all("requeue_expired", {})

    def fail_unclaimable(self, *, seconds: float,
                         limit: int = UNCLAIMABLE_BATCH) -> list[str]:
        """Fail queued builds whose toolchain no worker offered within ``seconds``.

        Only builds that waited longer than ``seconds`` too; their error names the
        toolchain they need and the ones the workers offer. Return their keys.
        """
        rows = self._all("fail_unclaimable", {"seconds": seconds, "limit": limit,
                                              "after": _span(seconds)})
        return [r["key"] for r in rows]

    def next_run_after(self) -> float | None:
        """Return seconds until the earliest delayed queued build may be claimed."""
        row = self._one("next_run_after", {})
        value = row["?column?"] if row else None
        if value is None:
            return None
        assert isinstance(value, dt.timedelta)
        return value.total_seconds()

    # workers ------------------------------------------------------------------------

    def register_worker(self, worker_id: str, *, hostname: str, pid: int, concurrency: int,
                        sandbox: str, go_version: str) -> None:
        """Record a worker as active."""
        self._one_exec("register_worker", {"id": worker_id, "hostname": hostname, "pid": pid,
                                           "concurrency": concurrency, "sandbox": sandbox,
                                           "go_version": go_version})

    def toolchain(self, *, live_seconds: float) -> tuple[str, str] | None:
        """Return (sandbox identity, Go version) new builds are keyed with, or None."""
        row = self._one("toolchain", {"seconds": live_seconds})
        return (row["sandbox"], row["go_version"]) if row else None

    def worker_heartbeat(self, worker_id: str) -> None:
        """Note that a worker is alive."""
        self._one_exec("worker_heartbeat", {"id": worker_id})

    def set_worker_state(self, worker_id: str, state: str) -> None:
        """Mark a worker active, draining or gone."""
        self._one_exec("set_worker_state", {"id": worker_id, "state": state})

    def mark_gone_workers(self, *, seconds: float) -> list[str]:
        """Mark workers without a heartbeat for ``seconds`` as gone; return their ids."""
        return [r["id"] for r in self._all("mark_gone_workers", {"seconds": seconds})]

    def list_workers(self) -> list[dict[str, Any]]:
        """Return every known worker with how many builds it runs."""
        return self._all("list_workers", {})

    def live_workers(self, *, seconds: float, sandbox: str | None = None,
                     go_version: str | None = None) -> int:
        """Return how many active workers sent a heartbeat within ``seconds``.

        With ``sandbox`` and ``go_version``, only the workers that have them, which are the
        ones that would claim a build keyed with them.
        """
        row = self._one("live_workers", {"seconds": seconds, "sandbox": sandbox,
                                         "go_version": go_version})
        return int(row["count"]) if row else 0

    # version resolutions ------------------------------------------------------------

    def get_resolution(self, module: str, query: str) -> tuple[str, float] | None:
        """Return a cached, unexpired resolution and when it was made (epoch seconds)."""
        row = self._one("get_resolution", {"module": module, "query": query})
        return (row["version"], row["stored_at"]) if row else None

    def put_resolution(self, module: str, query: str, version: str, *, stored_at: float,
                       ttl: float | None) -> None:
        """Cache a resolution; ``ttl`` None keeps it for good."""
        self._one_exec("put_resolution", {"module": module, "query": query,
                                          "version": version, "stored_at": stored_at,
                                          "ttl": ttl})

    def expire_resolutions(self) -> None:
        """Delete expired resolutions."""
        self._one_exec("expire_resolutions", {})


@cache
def _claim_any() -> str:
    """Return builds.sql's claim less its toolchain filter: it claims builds of any toolchain."""
    return "\n".join(line for line in queries()["claim"].splitlines()
                     if not line.endswith(TOOLCHAIN_MARK))


def _span(seconds: float) -> str:
    """Return a duration as people write it: 45 s, 30 min, 2 h, 1.5 days."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            amount = round(seconds / size, 1)
            return "1 day" if unit == "days" and amount == 1 else f"{amount:g} {unit}"
    return f"{round(seconds, 1):g} s"


def _enqueue_keeps(build: Build) -> bool:
    """Tell whether enqueueing this build again leaves it as it is (see the enqueue query)."""
    state = build.state
    if state == "succeeded":
        return build.artifact_path is not None
    if state == "failed":
        return build.error_kind != "retryable"
    return state in ("queued", "running")
