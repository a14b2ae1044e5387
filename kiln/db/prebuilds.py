"""The kiln_prebuild_versions table, and the popular configurations prebuilds are made of."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import ConnectionPool

from kiln.db.cursors import dict_cursor
from kiln.db.sql import queries as named_queries

SQL_FILE = "prebuilds.sql"


def queries() -> dict[str, str]:
    """Return the named queries of ``kiln/db/sql/prebuilds.sql``."""
    return named_queries(SQL_FILE)


@dataclass(frozen=True)
class Configuration:
    """What users download, without versions: a platform, plugin packages, replacements."""

    os: str
    arch: str
    arm: str
    #: plugin package paths, sorted
    packages: tuple[str, ...]
    #: the spec's replacements (each absolute), as BuildSpec.to_dict writes them
    replacements: tuple[dict[str, str], ...]
    #: downloads within the window, of every build of this configuration
    downloads: int
    #: the Caddy versions its downloaded builds were on
    caddy_versions: frozenset[str]
    #: the plugin modules' module@version pairs its downloaded builds were on
    module_versions: frozenset[str]

    def describe(self) -> str:
        """Return e.g. ``linux/arm/7 +github.com/a/b,github.com/c/d``."""
        platform = "/".join(p for p in (self.os, self.arch, self.arm) if p)
        return platform + (" +" + ",".join(self.packages) if self.packages else "")


def _configuration(row: dict[str, Any]) -> Configuration:
    pairs = {pair for build in row["module_versions"] for pair in build}
    return Configuration(
        os=row["os"], arch=row["arch"], arm=row["arm"],
        packages=tuple(str(p) for p in row["packages"]),
        replacements=tuple(dict(r) for r in row["replacements"]),
        downloads=int(row["downloads"]), caddy_versions=frozenset(row["caddy_versions"]),
        module_versions=frozenset(pairs))


class PrebuildRecords:
    """The latest versions the prebuild job last saw, and the downloads it ranks."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def popular(self, *, window: float, limit: int) -> list[Configuration]:
        """Return the ``limit`` configurations most downloaded within ``window`` seconds."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["popular"], {"window": window, "limit": limit})
            return [_configuration(r) for r in cur.fetchall()]

    def seen_versions(self, modules: Iterable[str]) -> dict[str, str]:
        """Return the latest version last recorded for each of ``modules`` that has one."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries()["seen_versions"], {"modules": sorted(set(modules))})
            return {r["module"]: r["version"] for r in cur.fetchall()}

    def record_versions(self, versions: dict[str, str]) -> None:
        """Remember each module's latest version (one transaction)."""
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            for module, version in sorted(versions.items()):
                cur.execute(queries()["record_version"], {"module": module, "version": version})
