"""PostgreSQL connections and the migration runner."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from kiln.config import DatabaseConfig

log = logging.getLogger(__name__)

#: the migrations shipped in the package (in a checkout, a link to the top-level migrations/)
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
#: advisory lock key that serializes migration runs ("kiln" in ASCII)
MIGRATION_LOCK = 0x6B696C6E
LOCK_TIMEOUT = "10s"
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

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


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


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    """A migration cannot be applied, or an applied one was changed."""


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Return the migrations in ``directory``, in order; refuse a directory with none."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        if not _NAME.match(path.name):
            raise MigrationError(f"{path.name}: migration files are named NNNN_words.sql")
        found.append(Migration(path.name, path.read_text()))
    if not found:
        # applying nothing would leave every service facing an empty database
        raise MigrationError(f"no migrations found in {directory}: a broken install "
                             "(Kiln's package carries them in kiln/migrations)")
    return found


class Migrator:
    """Apply numbered SQL files once each, recording name and checksum."""

    def __init__(self, conn: psycopg.Connection, *, directory: Path = MIGRATIONS_DIR) -> None:
        self.conn = conn
        self.directory = directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.conn.transaction():
            self.conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            yield

    def applied(self) -> dict[str, str]:
        """Return {name: checksum} of the migrations already applied."""
        self.conn.execute(
            """CREATE TABLE IF NOT EXISTS kiln_migrations (
                   name text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = self.conn.execute("SELECT name, checksum FROM kiln_migrations").fetchall()
        return {name: checksum for name, checksum in rows}

    def migrate(self) -> list[str]:
        """Apply pending migrations in one transaction; return their names."""
        migrations = load_migrations(self.directory)
        with self._locked():
            applied = self.applied()
            known = {m.name for m in migrations}
            for m in migrations:
                if m.name in applied and applied[m.name] != m.checksum:
                    raise MigrationError(
                        f"{m.name} was changed after it was applied: add a new migration instead"
                    )
            missing = sorted(set(applied) - known)
            if missing:
                log.warning("applied migrations not in %s: %s", self.directory, ", ".join(missing))
            pending = [m for m in migrations if m.name not in applied]
            for m in pending:
                log.info("applying migration %s", m.name)
                self.conn.execute(m.sql.encode())
                self.conn.execute(
                    "INSERT INTO kiln_migrations (name, checksum) VALUES (%s, %s)",
                    (m.name, m.checksum),
                )
        return [m.name for m in pending]


def migrate(url: str, config: DatabaseConfig) -> list[str]:
    """Connect, apply pending migrations, and return their names."""
    with connect(url, config, application="kiln-migrate") as conn:
        return Migrator(conn).migrate()
