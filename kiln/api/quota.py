"""Quotas: how many new builds a key or a client address may start per window.

Counters live in PostgreSQL (kiln_quota_usage), one row per subject and fixed window, so
the limits hold across any number of API processes. A new build is counted in the same
transaction that queues it, after the insert and before the commit: a request over the
limit rolls the insert back, so the build is never queued and no worker hears of it. A
request served from the store, or joining a build already queued, queues nothing and is not
counted (only the optional limit on all requests, ``quota.requests``, counts it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.api.principal import Principal, address_group
from kiln.db.quota import QuotaCounters
from kiln.errors import KilnError

#: expired counters deleted whenever a subject opens a new window (keeps the table small
#: without a scheduled job: each new row pays for removing old ones)
PRUNE_BATCH = 100


class QuotaExceeded(KilnError):
    """A subject used up its window; ``retry_after`` is seconds until the next one."""

    def __init__(self, message: str, *, retry_after: int, limit: str = "builds") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: which limit: "builds" (new builds) or "requests" (all build requests)
        self.limit = limit


class QuotaManager:
    """Enforce the per-window limits of ``quota`` (table kiln_quota_usage)."""

    def __init__(self, pool: ConnectionPool, *, window_seconds: int = 3600,
                 anonymous_builds: int = 0, key_builds: int = 0, requests: int = 0) -> None:
        self.pool = pool
        self.counters = QuotaCounters(pool)
        self.window_seconds = window_seconds
        self.anonymous_builds = anonymous_builds
        self.key_builds = key_builds
        self.requests = requests

    # limits -------------------------------------------------------------------------

    def build_limit(self, principal: Principal) -> int:
        """Return the new builds ``principal`` may start per window (0: no limit)."""
        if principal.key is None:
            return self.anonymous_builds
        if principal.is_admin:
            return 0
        if principal.key.builds_per_window is not None:
            return principal.key.builds_per_window
        return self.key_builds

    @staticmethod
    def subject(principal: Principal) -> str:
        """Return the counter name of a principal's new builds."""
        if principal.key is not None:
            return f"key:{principal.key.id}"
        return f"addr:{address_group(principal.address)}"

    # enforcement --------------------------------------------------------------------

    def admitter(self, principal: Principal) -> Callable[[psycopg.Cursor[Any]], None] | None:
        """Return the check QueueManager.enqueue runs before queueing a new build, or None."""
        limit = self.build_limit(principal)
        if limit <= 0:
            return None
        subject = self.subject(principal)

        def admit(cur: psycopg.Cursor[Any]) -> None:
            if not self._consume(cur, subject, limit):
                left = self._window_left(cur)
                raise QuotaExceeded(
                    f"{principal.describe()} has started the {limit} new build(s) allowed per "
                    f"{self.window_seconds} s; try again in {left} s. Builds that already "
                    "exist are still served." + ("" if principal.key else
                                                 " An API key may have a higher limit."),
                    retry_after=left)

        return admit

    def check_request(self, principal: Principal) -> None:
        """Count one build request of any kind; raise QuotaExceeded over ``quota.requests``."""
        if self.requests <= 0 or principal.is_admin:
            return
        subject = "req:" + self.subject(principal)
        with self.pool.connection() as conn, conn.transaction(), \
                conn.cursor(row_factory=dict_row) as cur:
            if self._consume(cur, subject, self.requests):
                return
            left = self._window_left(cur)
        raise QuotaExceeded(
            f"{principal.describe()} has made the {self.requests} build requests allowed per "
            f"{self.window_seconds} s; try again in {left} s.", retry_after=left,
            limit="requests")

    def usage(self, principal: Principal) -> int:
        """Return how many new builds ``principal`` started in the current window."""
        return self.counters.usage(self.subject(principal), window=self.window_seconds)

    def prune(self, cur: psycopg.Cursor[Any], *, limit: int = PRUNE_BATCH) -> None:
        """Delete up to ``limit`` counters of ended windows."""
        self.counters.prune(cur, window=self.window_seconds, limit=limit)

    def _consume(self, cur: psycopg.Cursor[Any], subject: str, limit: int) -> bool:
        used = self.counters.consume(cur, subject, limit=limit, window=self.window_seconds)
        if used is None:
            return False
        if used == 1:
            self.prune(cur)
        return True

    def _window_left(self, cur: psycopg.Cursor[Any]) -> int:
        return self.counters.window_left(cur, window=self.window_seconds)
