"""Kiln as a user installs it: the wheel, in a clean virtualenv outside the checkout.

What ships must run on its own: `kiln migrate` of an installed Kiln finds the migrations
the package carries and builds the schema in an empty database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import psycopg
import pytest

from kiln.db.migrate import MIGRATIONS_DIR, MigrationError, load_migrations
from tests.service import REPO

pytestmark = pytest.mark.slow


def test_the_installed_wheel_migrates_an_empty_database(
        tmp_path: Path, empty_db_url: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=600,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("kiln-*.whl"))
    shipped = sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist()
                     if n.startswith("kiln/migrations/") and n.endswith(".sql"))
    assert shipped == sorted(p.name for p in Path(REPO, "migrations").glob("*.sql"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=900,
                   capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(outside),
           "CONFIG_PATH": "/dev/null", "KILN_DATABASE__URL": empty_db_url,
           **{k: v for k, v in os.environ.items() if k.startswith(("SSL_", "PIP_"))}}
    done = subprocess.run([str(env_dir / "bin" / "kiln"), "migrate"], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(empty_db_url) as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM kiln_migrations ORDER BY name")]
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert applied == [m.name for m in load_migrations()]
    assert {"kiln_builds", "kiln_attempts", "kiln_build_logs"} <= tables


def test_a_directory_without_migrations_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found in .*a broken install"):
        load_migrations(tmp_path)
    # the checkout's own link to migrations/ holds them
    assert load_migrations(MIGRATIONS_DIR)
