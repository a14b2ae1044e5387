"""The cursor the table owners of kiln/db/ read rows through: rows as dicts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


@contextmanager
def dict_cursor(pool: ConnectionPool) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
    """Yield a cursor on a connection of ``pool`` whose rows are dicts."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        yield cur
