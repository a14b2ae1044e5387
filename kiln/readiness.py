"""What a Kiln process needs before it can do its job, said by name and reason.

A worker needs its database (with Kiln's schema), its artifact store and its build engine;
the API needs the database and the store. At start a worker waits for each, logging which
one is missing and why, and gives up with a clear error after ``worker.start_timeout``;
``kiln check`` runs the same checks once (the containers' health checks) and ``/healthz``
runs the API's, so nothing reports healthy while it cannot build or serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import PoolTimeout

from kiln.config import DatabaseConfig
from kiln.db.migrate import MIGRATIONS_DIR, MigrationError, load_migrations
from kiln.db.pool import connect
from kiln.errors import KilnError

log = logging.getLogger(__name__)

#: roles and what each needs, in the order they are checked
NEEDS = {
    "worker": ("database", "store", "engine"),
    "api": ("database", "store"),
    "janitor": ("database", "store"),
}
#: seconds between start-time checks: doubled up to the maximum
FIRST_DELAY = 1.0
MAX_DELAY = 15.0


class NotReady(KilnError):
    """A dependency cannot be used; the message says which and why."""


class Missing(NotReady):
    """A dependency that waiting will not bring (a missing image, a broken install)."""


@dataclass(frozen=True)
class Dependency:
    name: str
    #: returns nothing when usable; raises NotReady (or anything) saying why not
    check: Callable[[], None]


def where(url: str) -> str:
    """Return host:port/dbname of a database URL, without its credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the configured database"
    return f"{host}{port}{parts.path or ''}"


def first_line(exc: BaseException) -> str:
    """Return the first line of an error's message (psycopg's run to several), or its type."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def schema_check(opener: Callable[[], AbstractContextManager[psycopg.Connection]],
                 place: str) -> Callable[[], None]:
    """Connect with ``opener`` and compare the applied migrations with the ones Kiln carries."""

    def check() -> None:
        try:
            with opener() as conn:
                table = conn.execute("SELECT to_regclass('kiln_migrations')").fetchone()
                applied: set[str] = set()
                if table and table[0]:
                    applied = {r[0] for r in conn.execute("SELECT name FROM kiln_migrations")}
        except (psycopg.Error, PoolTimeout) as exc:
            raise NotReady(f"unreachable at {place}: {first_line(exc)}") from exc
        try:
            carried = load_migrations(MIGRATIONS_DIR)
        except MigrationError as exc:
            raise Missing(str(exc)) from exc
        pending = [m.name for m in carried if m.name not in applied]
        if pending:
            raise NotReady(
                f"{place} lacks {len(pending)} of Kiln's migrations (first: {pending[0]}): "
                "the janitor applies them at start, or run `kiln migrate`")

    return check


def database_check(url: str, config: DatabaseConfig) -> Callable[[], None]:
    """Open a connection of its own to the database ``url`` names, and check its schema."""
    return schema_check(lambda: connect(url, config, application="kiln-check"), where(url))


def probe(deps: Sequence[Dependency], *, missing: set[str] | None = None
          ) -> dict[str, str | None]:
    """Run every check once: {name: None when usable, else why not}.

    The names of dependencies that waiting will not bring are added to ``missing``.
    """
    results: dict[str, str | None] = {}
    for dep in deps:
        try:
            dep.check()
        except Exception as exc:  # any failure is a reason to report, not to crash on
            results[dep.name] = str(exc) if isinstance(exc, KilnError) else (
                f"{type(exc).__name__}: {first_line(exc)}")
            if missing is not None and isinstance(exc, Missing):
                missing.add(dep.name)
        else:
            results[dep.name] = None
    return results


def report(results: dict[str, str | None], *, role: str, consequence: str) -> None:
    """Log each failed check of a process that starts anyway, and what that means."""
    for name, why in results.items():
        if why is not None:
            log.warning("%s cannot use its %s: %s; %s", role, name, why, consequence)


def describe(results: dict[str, str | None]) -> str:
    """Return "database: why; engine: why" for the failed checks."""
    return "; ".join(f"{name}: {why}" for name, why in results.items() if why is not None)


def wait_ready(deps: Sequence[Dependency], *, role: str, timeout: float,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once every dependency is usable; raise NotReady after ``timeout`` seconds.

    Each failing dependency is logged with its reason when the reason changes (not on every
    retry), and again when it comes back. One that waiting will not bring (Missing) ends
    the wait at once.
    """
    deadline = clock() + timeout
    delay = FIRST_DELAY
    said: dict[str, str | None] = {}
    while True:
        missing: set[str] = set()
        results = probe(deps, missing=missing)
        for name, why in results.items():
            if why != said.get(name):
                if why is not None:
                    log.warning("%s waits for its %s: %s", role, name, why)
                elif name in said:
                    log.info("%s: %s is back", role, name)
            said[name] = why
        failed = describe(results)
        if not failed:
            return
        if missing:
            raise Missing(f"the {role} cannot start: {failed}")
        if clock() + delay > deadline:
            raise NotReady(f"the {role} cannot start after {timeout:.0f}s: {failed}")
        sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
