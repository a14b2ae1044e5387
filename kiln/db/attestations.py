"""The kiln_signing_keys and kiln_attestations tables."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries as named_queries


class AttestManager:
    """Signing keys and attestation records in PostgreSQL (queries in sql/attestations.sql)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        conn: psycopg.Connection
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(named_queries("attestations.sql")[name], params)
            return cur.fetchall() if cur.description else []

    def register_key(self, key_id: str, public_key: str) -> None:
        """Record a public key a worker signs with (or note that it was used again)."""
        self._rows("register_signing_key", {"key_id": key_id, "public_key": public_key})

    def signing_keys(self) -> list[dict[str, Any]]:
        """Return every known public key, the most recently used first."""
        return self._rows("signing_keys", {})

    def put(self, build_key: str, *, sha256: str, key_id: str | None,
            files: dict[str, str]) -> None:
        """Record what was published next to a build's artifact."""
        self._rows("put_attestation", {"build_key": build_key, "sha256": sha256,
                                       "key_id": key_id, "files": Jsonb(files)})

    def get(self, build_key: str) -> dict[str, Any] | None:
        """Return a build's attestation record, or None."""
        rows = self._rows("get_attestation", {"build_key": build_key})
        return rows[0] if rows else None

    def builds_by_sha256(self, sha256: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """Return succeeded builds whose artifact has this sha256, newest first."""
        return self._rows("builds_by_sha256", {"sha256": sha256, "limit": limit})
