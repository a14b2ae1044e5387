"""The migration runner: numbered SQL files, applied once each under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from kiln.config import DatabaseConfig
from kiln.db.pool import connect
from kiln.errors import KilnError

log = logging.getLogger(__name__)


#: the migrations shipped in the package (in a checkout, a link to the top-level migrations/)
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
#: advisory lock key that serializes migration runs ("kiln" in ASCII)
MIGRATION_LOCK = 0x6B696C6E
LOCK_TIMEOUT = "10s"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(KilnError):
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
