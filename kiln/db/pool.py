"""PostgreSQL connections and the migration runner."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from kiln.config import DatabaseConfig

log = logging.getLogger(__name__)

#: keepalives so a half-open connection is noticed in about a minute, not hours
KEEPALIVE_KWARGS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    # data sent to a vanished server (a query, a heartbeat) fails after 30 s instead of
    # TCP's retransmissions (~15 min); keepalives alone cover only idle connections
    "tcp_user_timeout": 30000,
}

#: a pooled connection handed out this recently is handed out again without a check query:
#: under load the check doubled the round trips of every query (bench/: claim throughput),
#: and a connection that just worked is almost surely fine (if not, the query fails like
#: any other, and the pool drops the broken connection when it is returned)
CHECK_IDLE_SECONDS = 2.0


def connect_kwargs(config: DatabaseConfig, *, application: str = "kiln") -> dict[str, object]:
    """Return the psycopg connection arguments every Kiln connection uses."""
    return {
        "connect_timeout": max(1, int(config.connect_timeout)),
        "application_name": application,
        "options": f"-c statement_timeout={int(config.statement_timeout * 1000)}",
        **KEEPALIVE_KWARGS,
    }


def connect(url: str, config: DatabaseConfig, *, application: str = "kiln",
            autocommit: bool = True) -> psycopg.Connection:
    """Open one connection (used for LISTEN and for short-lived tools)."""
    return psycopg.connect(url, autocommit=autocommit,
                           **connect_kwargs(config, application=application))  # type: ignore[arg-type]


def _check_if_idle(conn: psycopg.Connection) -> None:
    """Check a pooled connection with a round trip, unless it was handed out moments ago."""
    now = time.monotonic()
    last = getattr(conn, "_kiln_handed_out_at", None)
    conn._kiln_handed_out_at = now  # type: ignore[attr-defined]
    if last is not None and now - last < CHECK_IDLE_SECONDS:
        return
    ConnectionPool.check_connection(conn)


#: while no connection can be made, a caller waits this long for one (then gets an error:
#: the API answers 503) instead of the pool's whole timeout, for each of its queries
UNREACHABLE_WAIT_SECONDS = 1.0
#: a failing reconnection is retried with backoff (after 1, then 2 s) for this long, then
#: given up: the next caller starts a new attempt at once (psycopg_pool's default, 5 minutes
#: of doubling delays, kept a pool away from a restarted database for up to a minute)
RECONNECT_SECONDS = 5.0


class ResilientPool(ConnectionPool):
    """A connection pool that fails fast while the database is down and reconnects promptly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: monotonic time of the first failed connection attempt since the last success
        self.unreachable_since: float | None = None
        pool = self

        class Connection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, *cargs: Any, **ckwargs: Any) -> Any:
                try:
                    conn = super().connect(*cargs, **ckwargs)
                except psycopg.OperationalError:
                    if pool.unreachable_since is None:
                        pool.unreachable_since = time.monotonic()
                    raise
                pool.unreachable_since = None
                return conn

        super().__init__(*args, connection_class=Connection, **kwargs)

    def _unreachable(self) -> bool:
        return self.unreachable_since is not None and not self.get_stats().get("pool_available")

    def getconn(self, timeout: float | None = None) -> Any:
        """Return a connection; wait only briefly while the database is unreachable."""
        timeout = self.timeout if timeout is None else timeout
        first = min(timeout, UNREACHABLE_WAIT_SECONDS)
        if self._unreachable():
            return super().getconn(first)
        # wait in two steps: the first caller after the database went away learns it
        # (from the replacement connection that failed) within the first step
        started = time.monotonic()
        try:
            return super().getconn(first)
        except PoolTimeout:
            left = timeout - (time.monotonic() - started)
            if left <= 0 or self._unreachable():
                raise
        return super().getconn(left)


def make_pool(url: str, config: DatabaseConfig, *, application: str = "kiln",
              min_size: int | None = None, max_size: int | None = None,
              synchronous_commit: bool = True) -> ConnectionPool:
    """Open a connection pool; connections idle for a while are checked before use.

    ``synchronous_commit=False`` lets commits return before their WAL reaches the disk
    (only for writes that a server crash may lose without harm; see make_worker).
    """
    kwargs = connect_kwargs(config, application=application)
    if not synchronous_commit:
        kwargs["options"] = f"{kwargs['options']} -c synchronous_commit=off"
    pool = ResilientPool(
        url,
        min_size=config.pool_min if min_size is None else min_size,
        max_size=config.pool_max if max_size is None else max_size,
        kwargs={"autocommit": True, **kwargs},
        check=_check_if_idle,
        timeout=config.connect_timeout * 2,
        reconnect_timeout=RECONNECT_SECONDS,
        open=False,
        name=application,
    )
    pool.open(wait=False)
    return pool
