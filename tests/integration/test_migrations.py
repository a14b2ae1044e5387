"""The schema is built from the numbered migrations; the runner guards applied files."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from kiln.db.migrate import MIGRATIONS_DIR, MigrationError, Migrator, load_migrations


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
