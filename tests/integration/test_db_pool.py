"""Kiln's connection pools (kiln.db.pool.make_pool) on a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from kiln.config import DatabaseConfig
from kiln.db import pool as db


def _backend_pid(pool: object) -> int:
    with pool.connection() as conn:  # type: ignore[attr-defined]
        return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_worker_pools_commit_asynchronously_and_others_do_not(db_url: str) -> None:
    config = DatabaseConfig()
    with db.make_pool(db_url, config, max_size=1) as api, \
            db.make_pool(db_url, config, max_size=1, synchronous_commit=False) as worker:
        with api.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        with worker.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
            # the statement timeout of connect_kwargs still applies
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"


def test_an_idle_connection_that_died_is_replaced_before_use(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "CHECK_IDLE_SECONDS", 0.0)
    with db.make_pool(db_url, DatabaseConfig(), min_size=1, max_size=1) as pool:
        first = _backend_pid(pool)
        _terminate(db_url, first)
        assert _backend_pid(pool) != first


def test_a_connection_used_moments_ago_is_handed_out_unchecked(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the price of skipping the check under load: one failed query, then a new connection
    monkeypatch.setattr(db, "CHECK_IDLE_SECONDS", 3600.0)
    with db.make_pool(db_url, DatabaseConfig(), min_size=1, max_size=1) as pool:
        first = _backend_pid(pool)
        _terminate(db_url, first)
        with pytest.raises(psycopg.OperationalError):
            _backend_pid(pool)
        assert _backend_pid(pool) != first
