"""Shared fixtures: a real PostgreSQL, the synthetic Go module proxy, shared Go caches.

PostgreSQL: ``KILN_TEST_DATABASE_URL`` if set, else an embedded server (pgserver, which runs
postgres as an unprivileged system user). One template database is migrated per session;
each test gets a fresh copy of it.

Skips are never silent: pytest lists each with its reason (``-ra`` in pyproject.toml), and
with ``KILN_NO_SKIPS=1`` (CI sets it) a run that skipped anything fails, listing the skips.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kiln.db.migrate import Migrator
from tests.fixtures import goproxy
from tests.service import database_url

TEMPLATE_DB = "kiln_template"
#: set to 1 where every test must run (.ci/run): a skip then fails the run
NO_SKIPS_ENV = "KILN_NO_SKIPS"


class SkipLedger:
    """Note every skipped test or module with its reason; with ``strict``, fail the run."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.skips: list[str] = []

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):  # an expected failure: no skip
            return
        longrepr = report.longrepr
        reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
        self.skips.append(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.strict and self.skips and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not (self.strict and self.skips):
            return
        terminalreporter.section(f"{NO_SKIPS_ENV}=1 and {len(self.skips)} skipped: the run "
                                 "fails", sep="=", red=True, bold=True)
        for line in self.skips:
            terminalreporter.line(line, red=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(
        SkipLedger(strict=os.environ.get(NO_SKIPS_ENV) == "1"), "kiln-skip-ledger")


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the URL of a PostgreSQL server for the whole session."""
    given = os.environ.get("KILN_TEST_DATABASE_URL")
    if given:
        yield given
        return
    import pgserver

    # outside pytest's private tmp dir: postgres runs as another (unprivileged) user
    root = Path(tempfile.mkdtemp(prefix="kiln-test-pg-"))
    root.chmod(0o755)
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    """Create the template database from the migrations, once per session."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    with psycopg.connect(database_url(pg_server_url, TEMPLATE_DB), autocommit=True) as conn:
        Migrator(conn).migrate()
    return TEMPLATE_DB


@pytest.fixture
def db_url(pg_server_url: str, pg_template: str) -> Iterator[str]:
    """Return the URL of a fresh, migrated database for one test."""
    name = f"kiln_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    yield database_url(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """Return the URL of an empty database (no migrations applied)."""
    name = f"kiln_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield database_url(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def proxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the directory of the synthetic module proxy (file:// usable)."""
    return goproxy.generate(tmp_path_factory.mktemp("goproxy"))


@pytest.fixture(scope="session")
def proxy_server(proxy_dir: Path) -> Iterator[goproxy.ProxyServer]:
    """Serve the synthetic proxy over HTTP on 127.0.0.1."""
    server = goproxy.serve(proxy_dir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def go_cache_dir() -> Path:
    """Return the Go module and build cache shared by every test (and kept between runs)."""
    base = Path(os.environ.get("KILN_TEST_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln-tests")
    base.mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture(scope="session")
def real_cache_dir(go_cache_dir: Path) -> Path:
    """Return the Go caches of builds from the real module proxy (kept between runs).

    Apart from the synthetic proxy's: that one serves other files at some of the same
    module versions (github.com/caddyserver/caddy/v2 v2.8.0, which caddy-ratelimit
    requires), which the checksum database would rightly refuse.
    """
    path = go_cache_dir / "real-goproxy"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 for the session; yield its endpoint URL.

    Any access key is accepted; moto checks neither signatures nor presigned URL expiry.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start:\n" + log.read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
