"""``python -m bench --smoke``: every benchmark group still runs and writes its rows.

A smoke run measures nothing worth publishing and judges nothing; what an engineer would
notice is a group that crashes, or writes no rows, before a full ``make bench`` finds out
an hour in. The real Caddy group builds with the shared test caches (warm once the real
Caddy tests have run), so this test reaches the real Go module proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import REPO

pytestmark = pytest.mark.slow

#: the groups of ``python -m bench`` (bench/__main__.py GROUPS)
GROUPS = {"queue", "builds", "http", "real", "watchers", "recovery", "fuzz", "prebuild",
          "fleet"}
#: seconds a smoke run may take: every group, a few Go builds (cold ones on a new machine)
SMOKE_TIMEOUT_SECONDS = 2400


def test_smoke_run_writes_every_groups_rows(tmp_path: Path, go_cache_dir: Path) -> None:
    output = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)], cwd=REPO,
        env={**os.environ, "KILN_TEST_CACHE": str(go_cache_dir)}, capture_output=True,
        text=True, timeout=SMOKE_TIMEOUT_SECONDS, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((output / "results.json").read_text())
    table = (output / "results.md").read_text()
    assert results["machine"]["smoke"] is True
    assert "smoke mode" in table
    rows = results["rows"]
    assert {row["group"] for row in rows} == GROUPS, [(r["group"], r["benchmark"]) for r in rows]
    for row in rows:
        assert row["met"] is None, row  # a smoke run judges nothing
        assert f"| {row['benchmark']} |" in table
    assert set(results["details"]) == GROUPS

    # real Caddy: every tool built, Kiln's process sandbox beside xcaddy, the same binary
    assert results["details"]["real"]["failed"] == {}, results["details"]["real"]["failed"]
    real = [row for row in rows if row["group"] == "real"]
    process = next(row for row in real if row["benchmark"].startswith("real Caddy")
                   and "process sandbox" in row["benchmark"])
    assert process["figure"] is not None and process["peer"] is not None, process
    assert "the same bytes as xcaddy's" in process["note"], process
    run = results["details"]["real"]["runs"][0]
    assert run["xcaddy"]["warm"]["sha256"] == run["process"]["warm"]["sha256"]
    assert run["process"]["warm"]["peak_mib"] > 0, run["process"]["warm"]

    # fuzz: Schemathesis ran both passes against the service and its reports were read
    passes = results["details"]["fuzz"]["passes"]
    assert set(passes) == {"pinned", "free"}, passes
    for name, fuzzed in passes.items():
        assert fuzzed["cases"] > 0 and fuzzed["operations"] > 20, (name, fuzzed)

    # held connections: every watcher and download served, the API within its pool + LISTEN
    for held in results["details"]["watchers"]["runs"]:
        assert held["streams_served"] == held["downloads_served"] == held["clients"], held
        assert held["api_connections_peak"] <= results["details"]["watchers"]["pool_max"] + 1
        assert held["worker_class"] != "gevent" or held["os_threads"] == 1, held
    # recovery: during the outage every request was answered 503 with Retry-After
    restart = results["details"]["recovery"]["restart"][0]
    assert all(d["status"] == 503 and d["retry_after"] for d in restart["during"].values()), \
        restart
