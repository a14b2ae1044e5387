"""Quota counters in PostgreSQL (kiln_quota_usage): one row per subject and fixed window.

The policy (who may start how many builds) is kiln/api/quota.py's; this is its storage.
``consume`` and ``window_left`` run on the caller's cursor, inside the transaction that
queues the build, so that a refused build is rolled back with its count.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries

SQL_FILE = "quota.sql"


def _first(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, dict) else row[0]


class QuotaCounters:
    """Count uses per subject and window; the window's length is each call's ``window``."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def usage(self, subject: str, *, window: int) -> int:
        """Return how many uses ``subject`` counted in the current window."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries(SQL_FILE)["usage"], {"subject": subject, "window": window})
            row = cur.fetchone()
        return int(row["used"]) if row else 0

    def consume(self, cur: psycopg.Cursor[Any], subject: str, *, limit: int,
                window: int) -> int | None:
        """Count one use if ``subject`` is under ``limit``; return its count, or None."""
        cur.execute(queries(SQL_FILE)["consume"], {"subject": subject, "limit": limit,
                                                   "window": window})
        row = cur.fetchone()
        return None if row is None else int(_first(row, "used"))

    def window_left(self, cur: psycopg.Cursor[Any], *, window: int) -> int:
        """Return whole seconds (at least 1) until the next window opens."""
        cur.execute(queries(SQL_FILE)["window_left"], {"window": window})
        row = cur.fetchone()
        assert row is not None
        return max(1, math.ceil(float(_first(row, "seconds"))))

    def prune(self, cur: psycopg.Cursor[Any], *, window: int, limit: int) -> None:
        """Delete up to ``limit`` counters of ended windows."""
        cur.execute(queries(SQL_FILE)["prune"], {"window": window, "limit": limit})
