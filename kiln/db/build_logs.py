"""The kiln_build_logs table: build log lines by attempt."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries as named_queries

LOGS_CHANNEL = "kiln_logs"
#: the step name the worker uses for an attempt's last line ("succeeded: ..."/"failed: ...")
RESULT_STEP = "result"
#: lines read from the database per query when replaying a log
PAGE_LINES = 500


def queries() -> dict[str, str]:
    """Return the named queries of ``kiln/db/sql/build_logs.sql``."""
    return named_queries("build_logs.sql")


@dataclass(frozen=True)
class LogLine:
    """One stored line of a build's log."""

    attempt: int
    seq: int
    step: str
    line: str
    at: dt.datetime


class BuildLogs:
    """All access to kiln_build_logs."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def append(self, key: str, attempt: int,
               entries: list[tuple[int, str, str, float]]) -> int:
        """Store (seq, step, line, epoch seconds) entries and NOTIFY; return how many were new."""
        if not entries:
            return 0
        seqs, steps, lines, ats = (list(column) for column in zip(*entries, strict=True))
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()["append"], {"key": key, "attempt": attempt, "seqs": seqs,
                                              "steps": steps, "lines": lines, "ats": ats})
            row = cur.fetchone()
        return int(row["inserted"]) if row else 0

    def lines_after(self, key: str, attempt: int = 0, seq: int = 0, *,
                    limit: int = PAGE_LINES) -> list[LogLine]:
        """Return up to ``limit`` lines after (attempt, seq), in order."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()["lines_after"], {"key": key, "attempt": attempt, "seq": seq,
                                                   "limit": limit})
            return [LogLine(**row) for row in cur.fetchall()]

    def iter_lines(self, key: str) -> Iterator[LogLine]:
        """Yield every stored line of a build, a page at a time."""
        attempt, seq = 0, 0
        while True:
            page = self.lines_after(key, attempt, seq)
            yield from page
            if len(page) < PAGE_LINES:
                return
            attempt, seq = page[-1].attempt, page[-1].seq

    def line_step(self, key: str, attempt: int, seq: int) -> str | None:
        """Return the step of one line, or None if there is no such line."""
        row = self._one("line_step", {"key": key, "attempt": attempt, "seq": seq})
        return str(row["step"]) if row else None

    def latest_attempt(self, key: str) -> int:
        """Return the number of the build's latest attempt (0: it never ran)."""
        row = self._one("latest_attempt", {"key": key})
        return int(row["number"]) if row else 0

    def prune(self, *, older_than: float) -> int:
        """Delete lines older than ``older_than`` seconds; return how many."""
        with self.pool.connection() as conn:
            return conn.execute(queries()["prune"], {"seconds": older_than}).rowcount

    def _one(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return cur.fetchone()
