"""The kiln_webhooks table: callbacks and their deliveries."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.sql import queries as named_queries


class WebhookManager:
    """The kiln_webhooks table (queries in sql/webhooks.sql)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        conn: psycopg.Connection
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(named_queries("webhooks.sql")[name], params)
            return cur.fetchall() if cur.description else []

    def subscribe(self, build_key: str, url: str, *, base_url: str, requester: str,
                  secret: str) -> None:
        """Call ``url`` when the build next reaches a final state, signed with ``secret``.

        Once per build, URL and requester: asking again keeps one subscription and gives
        it the new secret.
        """
        self._rows("subscribe", {"build_key": build_key, "url": url, "base_url": base_url,
                                 "requester": requester, "secret": secret})

    def fire(self) -> int:
        """Turn the callbacks of finished builds into pending deliveries; return how many."""
        return len(self._rows("fire", {}))

    def claim(self, *, limit: int, lease_seconds: float) -> list[dict[str, Any]]:
        """Take due deliveries (counting the attempt) so no other sweep sends them meanwhile."""
        return self._rows("claim", {"limit": limit, "lease_seconds": lease_seconds})

    def delivered(self, delivery_id: int, *, status: int) -> None:
        """Record a 2xx answer."""
        self._rows("delivered", {"id": delivery_id, "status": status})

    def retry(self, delivery_id: int, *, status: int | None, error: str, delay: float,
              final: bool) -> None:
        """Record a failed attempt: try again after ``delay`` seconds, or give up."""
        self._rows("retry", {"id": delivery_id, "status": status, "error": error[:2000],
                             "delay": delay, "final": final})

    def for_build(self, build_key: str) -> list[dict[str, Any]]:
        """Return a build's callbacks and their delivery state (never their secrets)."""
        return self._rows("for_build", {"build_key": build_key})
