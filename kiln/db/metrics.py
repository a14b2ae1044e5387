"""The metrics table (kiln_metrics) and the reads /metrics makes of Kiln's tables.

Every process adds its counters and histograms here (kiln/metrics.py MetricsRecorder), and
any API process reports the sum (KilnCollector), so a scrape sees the whole fleet.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries

SQL_FILE = "metrics.sql"


class MetricsTable:
    """Add to the shared counters; read them and the gauges of builds, queue and workers."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Add each series' counts, sums and buckets in one transaction."""
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(queries(SQL_FILE)["add"], rows)

    def read(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run the named read of metrics.sql (recorded, builds_by_state, queue, workers, …)."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries(SQL_FILE)[name], params or {})
            return cur.fetchall()
