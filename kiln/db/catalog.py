"""The kiln_catalog table: mirrored plugin catalogs."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.db.cursors import dict_cursor
from kiln.db.sql import queries as named_queries


def queries() -> dict[str, str]:
    """Return the named queries of ``kiln/db/sql/catalog.sql``."""
    return named_queries("catalog.sql")


class CatalogStore:
    """The mirrored catalogs in kiln_catalog, and download counts of Kiln's own builds."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def get_mirror(self, source: str) -> dict[str, Any] | None:
        """Return the mirror row of an upstream URL, or None."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["get_mirror"], {"source": source})
            return cur.fetchone()

    def put_mirror(self, source: str, packages: list[dict[str, Any]], *, etag: str | None,
                   last_modified: str | None) -> None:
        """Replace the mirror of ``source`` with a fresh copy."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["put_mirror"], {
                "source": source, "packages": Jsonb(packages), "etag": etag,
                "last_modified": last_modified})

    def touch_mirror(self, source: str, *, error: str | None) -> None:
        """Record a refresh that changed nothing, or failed with ``error``."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["touch_mirror"], {"source": source, "error": error})

    def package_downloads(self) -> dict[str, int]:
        """Return how often Kiln's builds were downloaded, per plugin package."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["package_downloads"], {})
            return {r["package"]: int(r["downloads"]) for r in cur.fetchall()}
