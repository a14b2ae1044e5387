"""Build groups: one request for several platforms becomes one build per platform."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries as named_queries


def group_id(keys: Sequence[str]) -> str:
    """Return the id of the group of these build keys: the same keys, the same group."""
    return "g_" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]


class GroupManager:
    """The kiln_groups table (queries in sql/groups.sql)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        conn: psycopg.Connection
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(named_queries("groups.sql")[name], params)
            return cur.fetchall() if cur.description else []

    def create(self, keys: Sequence[str]) -> str:
        """Record a group of builds (idempotent); return its id."""
        gid = group_id(keys)
        self._rows("create_group", {"id": gid, "keys": list(keys)})
        return gid

    def keys(self, gid: str) -> list[str] | None:
        """Return the build keys of a group, in the order asked, or None."""
        rows = self._rows("group_keys", {"id": gid})
        return list(rows[0]["keys"]) if rows else None
