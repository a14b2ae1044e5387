"""The schema is built from the numbered migrations; the runner guards applied files."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.db.migrate import MIGRATIONS_DIR, MigrationError, Migrator, load_migrations
from kiln.db.sql import queries
from kiln.db.webhooks import WebhookManager


def test_migrations_from_zero_build_the_schema(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        applied = Migrator(conn).migrate()
        assert applied == [m.name for m in load_migrations()]
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"kiln_builds", "kiln_attempts", "kiln_workers", "kiln_migrations"} <= tables
        # the claim index is partial and matches the claim's ORDER BY
        indexdef = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'kiln_builds_claim_idx'"
        ).fetchone()[0]
        assert "priority DESC, queued_at, key" in indexdef
        assert "WHERE (state = 'queued'::text)" in indexdef
        # a second run applies nothing
        assert Migrator(conn).migrate() == []


def test_a_changed_applied_migration_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    for m in load_migrations():
        (tmp_path / m.name).write_text(m.sql)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        Migrator(conn, directory=tmp_path).migrate()
        first = sorted(tmp_path.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            Migrator(conn, directory=tmp_path).migrate()


def test_a_failing_migration_applies_nothing(empty_db_url: str, tmp_path: Path) -> None:
    for m in load_migrations():
        (tmp_path / m.name).write_text(m.sql)
    (tmp_path / "9998_ok.sql").write_text("CREATE TABLE kiln_probe (x int);")
    (tmp_path / "9999_bad.sql").write_text("SELECT * FROM no_such_table;")
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            Migrator(conn, directory=tmp_path).migrate()
        assert conn.execute("SELECT to_regclass('kiln_probe')").fetchone()[0] is None


def test_migration_files_are_numbered() -> None:
    names = [p.name for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    numbers = [int(n[:4]) for n in names]
    assert numbers == sorted(set(numbers)), "migration numbers must be unique"


# What the API of each release runs to subscribe a callback, copied from its
# kiln/db/sql/webhooks.sql: before 0007 (git show e2b3eb5^:kiln/db/sql/webhooks.sql) and
# with 0007 (e2b3eb5). During a rolling deploy they run against the newest schema.
SUBSCRIBE_BEFORE_0007 = """
INSERT INTO kiln_webhooks (build_key, url, base_url)
VALUES (%(build_key)s, %(url)s, %(base_url)s)
ON CONFLICT (build_key, url) WHERE state = 'waiting' DO NOTHING"""
SUBSCRIBE_0007 = """
INSERT INTO kiln_webhooks (build_key, url, base_url, requester, secret)
VALUES (%(build_key)s, %(url)s, %(base_url)s, %(requester)s, %(secret)s)
ON CONFLICT (build_key, url, requester) WHERE state = 'waiting'
DO UPDATE SET secret = EXCLUDED.secret, base_url = EXCLUDED.base_url"""
KEY = "ab" * 32
URL = "https://hooks.example.com/kiln"


def add_build(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO kiln_builds (key, spec) VALUES (%s, '{}')", (KEY,))


def subscribe(conn: psycopg.Connection, statement: str, requester: str = "",
              secret: str = "") -> None:
    conn.execute(statement, {"build_key": KEY, "url": URL, "base_url": "https://kiln.test",
                             "requester": requester, "secret": secret})


def fire(conn: psycopg.Connection) -> list[tuple[str, str | None]]:
    """Finish the build and turn its callbacks into deliveries; return (requester, secret)."""
    conn.execute("UPDATE kiln_builds SET state = 'succeeded', finished_at = now()")
    fired = conn.execute(queries("webhooks.sql")["fire"]).fetchall()
    return sorted(conn.execute(
        "SELECT requester, secret FROM kiln_webhooks WHERE state = 'pending' AND id = ANY(%s)",
        ([r[0] for r in fired],)).fetchall())


def test_every_release_s_api_subscribes_on_the_migrated_schema(db_url: str) -> None:
    # a rolling deploy: APIs from before 0007, of 0007 and of now share one database
    with psycopg.connect(db_url, autocommit=True) as conn:
        add_build(conn)
        subscribe(conn, SUBSCRIBE_BEFORE_0007)
        subscribe(conn, SUBSCRIBE_BEFORE_0007)  # asked twice: one callback, as it was
        pool = ConnectionPool(db_url, min_size=1, max_size=1, open=True,
                              kwargs={"autocommit": True})
        try:
            webhooks = WebhookManager(pool)
            webhooks.subscribe(KEY, URL, base_url="https://kiln.test", requester="k_a",
                               secret="a1")
            webhooks.subscribe(KEY, URL, base_url="https://kiln.test", requester="k_b",
                               secret="b1")
            webhooks.subscribe(KEY, URL, base_url="https://kiln.test", requester="k_b",
                               secret="b2")
            subscribe(conn, SUBSCRIBE_0007, "k_c", "c1")
            subscribe(conn, SUBSCRIBE_0007, "k_c", "c2")
            subscribe(conn, SUBSCRIBE_0007, "k_a", "a2")
        finally:
            pool.close()
        # each requester once, signed with the secret it was given last; the old API's
        # callback once, unsigned
        assert fire(conn) == [("", None), ("k_a", "a2"), ("k_b", "b2"), ("k_c", "c2")]


def test_upgrading_from_0007_keeps_its_subscriptions(empty_db_url: str, tmp_path: Path
                                                    ) -> None:
    for m in load_migrations():
        if m.name < "0008":
            (tmp_path / m.name).write_text(m.sql)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        Migrator(conn, directory=tmp_path).migrate()
        add_build(conn)
        subscribe(conn, SUBSCRIBE_0007, "k_a", "a1")
        subscribe(conn, SUBSCRIBE_0007, "k_b", "b1")
        # a row from before 0007: no requester, no secret
        conn.execute("INSERT INTO kiln_webhooks (build_key, url) VALUES (%s, %s)", (KEY, URL))
        assert [m for m in Migrator(conn).migrate() if m >= "0008"] == [
            m.name for m in load_migrations() if m.name >= "0008"]
        subscribe(conn, SUBSCRIBE_BEFORE_0007)  # joins the one without a requester
        assert fire(conn) == [("", None), ("k_a", "a1"), ("k_b", "b1")]
