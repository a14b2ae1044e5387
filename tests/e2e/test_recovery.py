"""Recovery end to end: no failure loses a build or serves a wrong artifact.

Real processes throughout: gunicorn, worker and janitor processes, PostgreSQL, the Go
toolchain, the artifact directory. A worker killed with SIGKILL mid-build; the artifact
store failing during an upload; storage GC over a size budget followed by a request for
the collected build; a PostgreSQL server stopped and restarted under a running service.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from kiln.db.migrate import Migrator
from tests.fixtures import goproxy as gp
from tests.processes import (
    PgCluster,
    ensure_worker,
    kill_sandbox_processes,
    own_cluster,
    start_without_a_worker,
)
from tests.service import REPO, KilnProcesses

pytestmark = pytest.mark.slow

LEASE_SECONDS = 5  # tests/service.py's worker lease
JANITOR_ENV = {"KILN_JANITOR__REQUEUE_INTERVAL": "1"}


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return JANITOR_ENV


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_without_a_worker


def query(url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params or {}).fetchall()


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stored_files(kiln: KilnProcesses, key: str) -> dict[str, int]:
    """Return {file name: size} of what the store holds for a build (staging included)."""
    store = kiln.root / "artifacts"
    found = {p.name: p.stat().st_size for p in (store / "builds" / key[:2] / key).glob("*")}
    staging = store / ".tmp"
    if staging.is_dir():
        found |= {f".tmp/{p.name}": p.stat().st_size for p in staging.glob(f"{key}*")}
    return found


def run_binary(content: bytes, tmp_path: Path, *args: str) -> str:
    binary = tmp_path / "caddy"
    binary.write_bytes(content)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def test_killed_worker_build_is_finished_by_another_after_its_lease(
        kiln: KilnProcesses, tmp_path: Path) -> None:
    url = kiln.db_url
    # a fresh instance with a cold build cache: its build is still running when it dies
    victim = kiln.start_worker("victim", env={
        "KILN_WORKER__ID": "victim", "KILN_BUILD__CACHE_DIR": str(tmp_path / "cold")})
    kiln.wait_for_worker("victim")
    held: dict[str, requests.Response] = {}
    params = [("os", "linux"), ("arch", "amd64"), ("version", "v2.8.0"),
              ("p", gp.DNS_PACKAGE)]

    def download() -> None:  # what `caddy upgrade` does: one GET, held until the binary
        held["resp"] = requests.get(kiln.url + "/api/download", params=params, timeout=300)

    client = threading.Thread(target=download)
    client.start()
    key = wait_for("the victim to claim the build", lambda: query(
        url, "SELECT key FROM kiln_builds WHERE worker_id = 'victim' AND state = 'running'"))[0][0]

    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    kill_sandbox_processes(key)  # the process sandbox's steps outlive their worker
    victim.wait(10)
    ensure_worker(kiln)
    wait_for("the expired lease to be requeued", lambda: query(
        url, "SELECT 1 FROM kiln_attempts WHERE build_key = %(k)s AND outcome = 'lost'",
        {"k": key}), timeout=LEASE_SECONDS + 30)
    requeued = time.monotonic() - killed
    print(f"\nkill -9 -> requeued in {requeued:.2f}s (lease {LEASE_SECONDS}s, janitor every 1s)")

    client.join(180)
    resp = held["resp"]
    assert resp.status_code == 200, resp.text
    final = kiln.wait_build(key, timeout=10)
    assert final["state"] == "succeeded"
    assert final["attempts"] == 2
    assert [(a["outcome"], a["worker_id"]) for a in final["attempt_history"]] == [
        ("lost", "victim"), ("succeeded", final["attempt_history"][1]["worker_id"])]
    assert hashlib.sha256(resp.content).hexdigest() == final["artifact"]["sha256"]
    # one artifact, nothing half-written left behind
    files = stored_files(kiln, key)
    assert files["caddy_linux_amd64_custom"] == len(resp.content)
    assert not [name for name in files if name.startswith(".tmp/")]
    assert run_binary(resp.content, tmp_path, "version").startswith("v2.8.0")
    assert gp.DNS_ID in run_binary(resp.content, tmp_path, "list-modules")


def test_storage_failure_during_upload_is_retried_and_nothing_partial_is_served(
        kiln: KilnProcesses, tmp_path: Path) -> None:
    url = kiln.db_url
    ensure_worker(kiln)
    staging = kiln.root / "artifacts" / ".tmp"
    shutil.rmtree(staging)
    staging.write_text("the store's staging area is broken\n")  # every upload now fails
    try:
        resp = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
                                "plugins": [f"{gp.HELLO}@v0.2.0"]})
        assert resp.status_code == 202, resp.text
        key = resp.json()["key"]
        wait_for("the first upload to fail", lambda: query(
            url, "SELECT 1 FROM kiln_attempts WHERE build_key = %(k)s AND outcome = 'failed'",
            {"k": key}))
        doc = requests.get(f"{kiln.url}/api/builds/{key}", timeout=10).json()
        assert doc["state"] in ("queued", "running") and doc["retryable"] is True, doc
        artifact = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=10)
        assert artifact.status_code == 404 and "error" in artifact.json()
        assert stored_files(kiln, key) == {}
    finally:
        staging.unlink()
        staging.mkdir()
    final = kiln.wait_build(key, timeout=120)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    history = final["attempt_history"]
    assert [a["outcome"] for a in history] == ["failed", "succeeded"]
    assert "StorageError" in history[0]["error"]
    body = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=30).content
    assert hashlib.sha256(body).hexdigest() == final["artifact"]["sha256"]
    assert stored_files(kiln, key)["caddy_linux_amd64_custom"] == len(body)
    assert "hello" in run_binary(body, tmp_path, "list-modules")


def test_gc_over_budget_then_a_request_rebuilds_the_same_binary(kiln: KilnProcesses) -> None:
    ensure_worker(kiln)
    spec = {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_LATEST}
    key = kiln.post_build(spec).json()["key"]
    built = kiln.wait_build(key)
    assert built["state"] == "succeeded"
    # a one-shot janitor with a budget smaller than any artifact collects everything
    run = subprocess.run(
        [sys.executable, "-m", "functions.janitor", "--once", "--job", "storage_gc"],
        cwd=REPO, env={**kiln.env, "KILN_JANITOR__STORAGE_BUDGET_BYTES": "1",
                       "KILN_JANITOR__GC_GRACE_SECONDS": "0"},
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "over budget" in run.stdout + run.stderr
    assert stored_files(kiln, key) == {}
    gone = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=10)
    assert gone.status_code == 404
    doc = requests.get(f"{kiln.url}/api/builds/{key}", timeout=10).json()
    assert doc["state"] == "succeeded" and "artifact" not in doc
    # the next request for it builds it again: the same bytes (reproducible builds)
    again = kiln.post_build(spec)
    assert again.status_code == 202 and again.json()["key"] == key
    rebuilt = kiln.wait_build(key)
    assert rebuilt["state"] == "succeeded"
    assert rebuilt["artifact"]["sha256"] == built["artifact"]["sha256"]
    body = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=30).content
    assert hashlib.sha256(body).hexdigest() == built["artifact"]["sha256"]


# a PostgreSQL server of our own, stopped and restarted under a running service -----------


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    with own_cluster("kiln-outage-") as cluster:
        yield cluster


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_database_outage_fails_cleanly_then_every_build_finishes(
        own_pg: PgCluster, tmp_path: Path, proxy_dir: Path, go_cache_dir: Path) -> None:
    with psycopg.connect(own_pg.url, autocommit=True) as conn:
        Migrator(conn).migrate()
    # polls are rare: after the outage, only a re-LISTENed notification wakes the worker
    kiln = KilnProcesses(db_url=own_pg.url, root=tmp_path, goproxy=f"file://{proxy_dir}",
                         cache_dir=go_cache_dir, env={**JANITOR_ENV,
                                                      "KILN_WORKER__POLL_SECONDS": "600",
                                                      "KILN_WORKER__CONCURRENCY": "1"})
    try:
        kiln.start_worker()
        kiln.wait_for_worker()
        kiln.start_janitor()
        kiln.start_api()
        keys = []
        for version in (gp.CADDY_OLDEST, "v2.8.0", gp.CADDY_LATEST):
            resp = kiln.post_build({"os": "linux", "arch": "arm64", "caddy_version": version})
            assert resp.status_code == 202, resp.text
            keys.append(resp.json()["key"])

        own_pg.stop()
        stopped = time.monotonic()
        during = {
            "POST /api/builds": timed(lambda: kiln.post_build(
                {"os": "linux", "arch": "arm64", "caddy_version": "v2.8.0",
                 "plugins": [gp.DNS_PACKAGE]})),
            "GET /api/builds/{key}": timed(lambda: requests.get(
                f"{kiln.url}/api/builds/{keys[0]}", timeout=60)),
            "GET /healthz": timed(lambda: requests.get(kiln.url + "/healthz", timeout=60)),
        }
        for name, (resp, took) in during.items():
            print(f"\n{name} during the outage: {resp.status_code} in {took:.2f}s")
            assert resp.status_code == 503, (name, resp.text)
            body = resp.json()
            assert body["status_code"] == 503 and body["error"]["message"], body
            assert resp.headers["Retry-After"]
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))

        own_pg.start()
        restarted = time.monotonic()
        kiln.wait_healthy(timeout=60)
        print(f"\nAPI healthy {time.monotonic() - restarted:.2f}s after PostgreSQL came back")
        for key in keys:
            final = kiln.wait_build(key, timeout=180)
            assert final["state"] == "succeeded", final
        print(f"all {len(keys)} builds done {time.monotonic() - restarted:.2f}s after restart")
        # the worker listens again: a new build is claimed on its notification
        resp = kiln.post_build({"os": "linux", "arch": "arm64", "caddy_version": "v2.8.0",
                                "plugins": [gp.DNS_PACKAGE]})
        assert resp.status_code == 202, resp.text
        assert kiln.wait_build(resp.json()["key"], timeout=120)["state"] == "succeeded"
        for name in ("api", "worker", "janitor"):
            assert kiln.procs[name].poll() is None, f"{name} died:\n{kiln.log(name)[-3000:]}"
    finally:
        kiln.close()
