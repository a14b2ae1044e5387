"""A deployment that cannot reach its database, store or engine says which and why.

The worker waits for what it needs at start (and gives up with a clear error), ``kiln
check`` (the containers' health check) names each missing dependency, and the API's
/healthz answers 503 naming it: nothing reports healthy while it cannot build or serve.
Real PostgreSQL, a real S3 server (moto), real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import psycopg
import pytest
import requests

from kiln.config import DatabaseConfig
from kiln.db.migrate import migrate
from tests.dockerutil import require_docker
from tests.service import REPO, KilnProcesses, free_port, wait_for


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "KILN_STORAGE__BACKEND": "s3",
        "KILN_STORAGE__S3__BUCKET": bucket,
        "KILN_STORAGE__S3__ENDPOINT_URL": endpoint,
        "KILN_STORAGE__S3__REGION": "us-east-1",
        "KILN_STORAGE__S3__ACCESS_KEY_ID": "test",
        "KILN_STORAGE__S3__SECRET_ACCESS_KEY": "test",
    }


def make_bucket(endpoint: str, bucket: str) -> None:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test",
                 ).create_bucket(Bucket=bucket)


def kiln_check(env: dict[str, str], role: str = "worker") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln.cli", "check", "--role", role],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def kiln(empty_db_url: str, tmp_path: Path, proxy_server, go_cache_dir: Path) -> KilnProcesses:
    procs = KilnProcesses(db_url=empty_db_url, root=tmp_path, goproxy=proxy_server.url,
                          cache_dir=go_cache_dir)
    yield procs
    procs.close()


def test_kiln_check_names_each_missing_dependency_until_all_are_there(
        kiln: KilnProcesses, empty_db_url: str, s3_endpoint: str) -> None:
    bucket = f"kiln-check-{os.getpid()}-{time.monotonic_ns()}"
    env = {**kiln.env, **s3_env(s3_endpoint, bucket), "KILN_BUILD__SANDBOX": "process"}
    unreachable = {**env, "KILN_DATABASE__URL": f"postgresql://kiln@127.0.0.1:{free_port()}/kiln"}
    out = kiln_check(unreachable)
    assert out.returncode == 1
    assert "database: unreachable at 127.0.0.1:" in out.stdout
    assert f"store: bucket {bucket} at {s3_endpoint}: no such bucket" in out.stdout
    assert "engine: ok" in out.stdout  # the process sandbox has the pinned Go
    # reachable, but no schema yet: the migrations are named, and how to apply them
    out = kiln_check(env)
    assert out.returncode == 1
    assert "of Kiln's migrations" in out.stdout and "kiln migrate" in out.stdout
    migrate(empty_db_url, DatabaseConfig())
    make_bucket(s3_endpoint, bucket)
    out = kiln_check(env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["database:", "ok", "store:", "ok", "engine:", "ok"]
    # the docker sandbox, asked for where no engine answers, is named as the engine's fault
    out = kiln_check({**env, "KILN_BUILD__SANDBOX": "docker",
                      "DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"})
    assert out.returncode == 1
    assert "engine: build.sandbox docker: no Docker Engine answers" in out.stdout


def test_worker_waits_for_its_schema_and_store_then_builds(
        kiln: KilnProcesses, empty_db_url: str, s3_endpoint: str) -> None:
    bucket = f"kiln-wait-{os.getpid()}-{time.monotonic_ns()}"
    kiln.env.update(s3_env(s3_endpoint, bucket))
    worker = kiln.start_worker()
    wait_for("the worker to say what it waits for", lambda: (
        "waits for its database" in kiln.log("worker")
        and "of Kiln's migrations" in kiln.log("worker")
        and f"waits for its store: bucket {bucket}" in kiln.log("worker")), timeout=60)
    assert worker.poll() is None, "the worker gave up instead of waiting"
    assert " ready: concurrency" not in kiln.log("worker")
    # what a janitor (or an operator) does next: the worker notices and starts
    migrate(empty_db_url, DatabaseConfig())
    make_bucket(s3_endpoint, bucket)
    kiln.wait_for_worker(timeout=60)
    assert "worker: database is back" in kiln.log("worker")
    with psycopg.connect(empty_db_url) as conn:
        states = [r[0] for r in conn.execute("SELECT state FROM kiln_workers")]
    assert states == ["active"]
    kiln.start_api()
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0"}).json()
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "succeeded", final
    # stored in the bucket that was missing when the worker started
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert any(o["Size"] == final["artifact"]["size"] for o in listed)


def test_worker_gives_up_after_start_timeout_saying_which_and_why(
        kiln: KilnProcesses) -> None:
    port = free_port()
    worker = kiln.start_worker(env={
        "KILN_DATABASE__URL": f"postgresql://kiln:secret@127.0.0.1:{port}/kiln",
        "KILN_WORKER__START_TIMEOUT": "3"})
    assert worker.wait(60) == 2
    log = kiln.log("worker")
    assert f"the worker cannot start after 3s: database: unreachable at 127.0.0.1:{port}/kiln" \
        in log
    assert "secret" not in log  # the URL's password is never logged
    assert "Traceback" not in log


def test_healthz_is_503_naming_the_store_or_schema_until_both_are_there(
        kiln: KilnProcesses, empty_db_url: str, s3_endpoint: str) -> None:
    bucket = f"kiln-health-{os.getpid()}-{time.monotonic_ns()}"
    kiln.env.update(s3_env(s3_endpoint, bucket))
    kiln._spawn("api", [sys.executable, "-m", "gunicorn", "functions.api:app",
                        "--bind", f"127.0.0.1:{kiln.port}", "--threads", "4"])

    def health() -> requests.Response | None:
        try:
            return requests.get(kiln.url + "/healthz", timeout=5)
        except requests.RequestException:
            return None

    # (a Response is falsy unless 2xx: wrap it)
    first = wait_for("the API to answer", lambda: (r := health()) is not None and [r],
                     timeout=60)[0]
    assert first.status_code == 503
    body = first.json()
    text = str(body)
    assert "schema:" in text and "kiln migrate" in text
    assert f"store: bucket {bucket}" in text and "no such bucket" in text
    assert "cannot use its store" in kiln.log("api")  # said at start, in the log too
    migrate(empty_db_url, DatabaseConfig())
    make_bucket(s3_endpoint, bucket)
    ok = wait_for("/healthz to turn 200", lambda: (
        (r := health()) is not None and r.status_code == 200 and [r]), timeout=30)[0]
    assert ok.json() == {"status": "ok", "checks": {"database": "ok", "schema": "ok",
                                                     "store": "ok"}}


@pytest.mark.docker
def test_worker_without_its_sandbox_image_stops_at_once_naming_it(
        kiln: KilnProcesses, empty_db_url: str) -> None:
    """Waiting will not build a missing image: the worker says so and exits, no retry."""
    require_docker()
    migrate(empty_db_url, DatabaseConfig())
    worker = kiln.start_worker(env={"KILN_BUILD__SANDBOX": "docker",
                                    "KILN_BUILD__DOCKER__IMAGE": "kiln-no-such:image"})
    assert worker.wait(60) == 2
    log = kiln.log("worker")
    assert "the worker cannot start: engine: build.sandbox docker: no kiln-no-such:image " \
        "image: run `make images`" in log
    assert log.count("waits for its engine") == 1  # said once, not retried
