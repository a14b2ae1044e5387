"""The janitor's own queries (job locks and turns, storage GC, pruning)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries as named_queries

log = logging.getLogger(__name__)


#: first argument of the two-key advisory locks that guard janitor jobs ("jnt" in ASCII)
LOCK_CLASS = 0x6A6E74
#: longest a job's result is kept in kiln_janitor_runs
RESULT_CHARS = 1000
#: rows deleted per statement when pruning
PRUNE_BATCH = 5000


def queries() -> dict[str, str]:
    """Return the named queries of ``kiln/db/sql/maintenance.sql``."""
    return named_queries("maintenance.sql")


def lock_id(job: str) -> int:
    """Return the stable signed 32-bit advisory lock id of a job name."""
    value = zlib.crc32(job.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class Maintenance:
    """All access the janitor's own jobs make to the database (kiln/db/sql/maintenance.sql)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _all(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return cur.fetchall() if cur.description else []

    def _count(self, name: str, params: dict[str, Any]) -> int:
        with self.pool.connection() as conn:
            return conn.execute(queries()[name], params).rowcount

    # job locks and turns ------------------------------------------------------------

    @contextmanager
    def job_lock(self, job: str) -> Iterator[bool]:
        """Hold the job's advisory lock while the block runs; yield False if another has it."""
        params = {"class": LOCK_CLASS, "id": lock_id(job)}
        with self.pool.connection() as conn:
            row = conn.execute(queries()["try_lock"], params).fetchone()
            locked = bool(row and row[0])
            try:
                yield locked
            finally:
                if locked:
                    try:
                        conn.execute(queries()["unlock"], params)
                    except psycopg.Error as exc:
                        # closing ends the session, which releases the lock; the pool then
                        # drops the connection instead of lending it out still locked
                        log.warning("could not release the lock of %s: %s", job, exc)
                        conn.close()

    def take_turn(self, job: str, *, min_gap: float) -> bool:
        """Record that ``job`` starts now, unless it started within ``min_gap`` seconds."""
        return bool(self._all("take_turn", {"job": job, "min_gap": min_gap}))

    def finish_turn(self, job: str, *, ok: bool, result: str) -> None:
        """Record how a job's run ended."""
        self._count("finish_turn", {"job": job, "ok": ok, "result": result[:RESULT_CHARS]})

    def runs(self) -> list[dict[str, Any]]:
        """Return the last run of every job."""
        return self._all("runs", {})

    def db_now(self) -> Any:
        """Return the database's clock (timestamps compared with rows come from it)."""
        return self._all("db_now", {})[0]["now"]

    # storage GC ---------------------------------------------------------------------

    def expired_artifacts(self, *, seconds: float, limit: int) -> list[str]:
        """Return builds whose artifact was not used within ``seconds``, oldest first."""
        return [r["key"] for r in self._all("expired_artifacts",
                                            {"seconds": seconds, "limit": limit})]

    def artifacts_by_last_use(self) -> Iterator[str]:
        """Yield the keys of builds holding an artifact, least recently used first."""
        after_used: Any = "-infinity"
        after_key = ""
        while True:
            page = self._all("artifacts_by_last_use", {"after_used": after_used,
                                                       "after_key": after_key, "limit": 1000})
            for row in page:
                yield row["key"]
            if len(page) < 1000:
                return
            after_used, after_key = page[-1]["last_used"], page[-1]["key"]

    @contextmanager
    def locked_artifact(self, key: str, *, older_than: float | None) -> Iterator[bool]:
        """Lock a build that still holds a collectable artifact; detach it if the block ends.

        Yields False (and changes nothing) when the build no longer qualifies. The row lock
        is held until the block returns, so no request can queue a rebuild of the key while
        its objects are being deleted.
        """
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(queries()["lock_artifact"],
                               {"key": key, "older_than": older_than}).fetchone()
            if row is None:
                yield False
                return
            yield True
            conn.execute(queries()["detach_artifact"], {"key": key})

    @contextmanager
    def locked_build(self, key: str) -> Iterator[tuple[dict[str, Any] | None, Callable[[], None]]]:
        """Lock a build row (None if there is none); yield it and a function detaching it."""
        with self.pool.connection() as conn, conn.transaction(), \
                conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()["lock_build"], {"key": key})
            row = cur.fetchone()

            def detach() -> None:
                conn.execute(queries()["detach_artifact"], {"key": key})

            yield row, detach

    def published(self) -> dict[str, tuple[str, Any]]:
        """Return {key: (artifact path, finished at)} of every build holding an artifact."""
        return {r["key"]: (r["artifact_path"], r["finished_at"])
                for r in self._all("published", {})}

    # pruning ------------------------------------------------------------------------

    def prune_attempts(self, *, seconds: float) -> int:
        """Delete finished attempts older than ``seconds``; return how many."""
        return self._batched("prune_attempts", seconds)

    def prune_workers(self, *, seconds: float) -> int:
        """Delete gone workers older than ``seconds`` (never the newest); return how many."""
        return self._count("prune_workers", {"seconds": seconds})

    def prune_logs(self, *, seconds: float) -> int:
        """Delete build log lines older than ``seconds``, if Kiln keeps logs; return how many."""
        present = self._all("table_exists", {"name": "kiln_build_logs"})
        if not present or not present[0]["present"]:
            return 0
        return self._batched("prune_logs", seconds)

    def _batched(self, name: str, seconds: float) -> int:
        total = 0
        while True:
            deleted = self._count(name, {"seconds": seconds, "batch": PRUNE_BATCH})
            total += deleted
            if deleted < PRUNE_BATCH:
                return total
