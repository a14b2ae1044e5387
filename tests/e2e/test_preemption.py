"""Spot preemption end to end: a worker process drains on a real-protocol notice.

A fake instance metadata server on 127.0.0.1 (``tests/metadata.py``) speaks AWS IMDSv2, GCE's metadata server and
Azure Scheduled Events (token, headers, status codes, acknowledgement). A worker with a cold
build cache (a fresh spot instance) claims a build; the notice arrives; the worker stops
its sandbox, hands the build back without spending an attempt, marks itself draining then
gone, and exits 0. An ephemeral worker (``--max-jobs 1``) then completes the build.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kiln.worker.preemption import AwsSpotDetector, AzureDetector, GceDetector, Notice
from tests.fixtures import goproxy as gp
from tests.metadata import EVENT_ID, MetadataState, serving
from tests.processes import sandbox_processes
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metadata() -> Iterator[tuple[str, MetadataState]]:
    with serving() as served:
        yield served


def start_after_an_ephemeral_worker(service: KilnProcesses) -> None:
    """Start the API once a worker has registered (the API keys builds by its toolchain)."""
    service.start_worker("first", args=["--idle-exit", "0.5"])
    service.wait_for_worker("first")
    assert service.procs["first"].wait(30) == 0  # idle-exit: an ephemeral worker
    service.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_after_an_ephemeral_worker


def query(kiln: KilnProcesses, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(kiln.db_url) as conn:
        return conn.execute(sql, params or {}).fetchall()


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


BUILDS = {
    "aws": {"caddy_version": gp.CADDY_OLDEST},
    "gce": {"caddy_version": "v2.8.0"},
    "azure": {"caddy_version": gp.CADDY_LATEST},
    "signal": {"caddy_version": "v2.8.0", "plugins": [f"{gp.HELLO}@v0.1.0"]},
}


@pytest.mark.parametrize("provider", ["aws", "gce", "azure", "signal"])
def test_preempted_worker_drains_and_its_build_completes_elsewhere(
        kiln: KilnProcesses, metadata: tuple[str, MetadataState], provider: str,
        tmp_path: Path) -> None:
    url, state = metadata
    state.reset()
    victim = f"spot-{provider}"
    cold_cache = tmp_path / "cold-cache"  # a fresh instance: its build takes a while
    env = {
        "KILN_WORKER__ID": victim,
        "KILN_WORKER__CONCURRENCY": "2",
        "KILN_BUILD__CACHE_DIR": str(cold_cache),
        "KILN_WORKER__PREEMPTION__PROVIDERS": "[]" if provider == "signal" else f"[{provider}]",
        "KILN_WORKER__PREEMPTION__AWS_URL": url,
        "KILN_WORKER__PREEMPTION__GCE_URL": url,
        "KILN_WORKER__PREEMPTION__AZURE_URL": url,
    }
    proc = kiln.start_worker(victim, env=env)
    kiln.wait_for_worker(victim)
    resp = kiln.post_build({"os": "linux", "arch": "amd64", **BUILDS[provider]})
    assert resp.status_code == 202, resp.text
    key = resp.json()["key"]
    wait_for("the spot worker to claim the build", lambda: query(
        kiln, "SELECT 1 FROM kiln_builds WHERE key = %(k)s AND worker_id = %(w)s "
              "AND state = 'running'", {"k": key, "w": victim}))

    noticed = time.monotonic()
    if provider == "signal":
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        with state.lock:
            state.preempted = True
    assert proc.wait(30) == 0, kiln.log(victim)[-3000:]
    drained = time.monotonic() - noticed
    print(f"\n{provider}: notice -> worker drained and exited in {drained:.2f}s")

    log = kiln.log(victim)
    assert f"after the notice ({provider}:" in log
    assert log.index(f"worker {victim} is draining") < log.index(f"worker {victim} is gone")
    # handed back at once, without spending an attempt
    doc = query(kiln, "SELECT state, attempts, worker_id FROM kiln_builds WHERE key = %(k)s",
                {"k": key})
    assert doc == [("queued", 0, None)]
    assert query(kiln, "SELECT state FROM kiln_workers WHERE id = %(w)s",
                 {"w": victim}) == [("gone",)]
    # its sandbox was stopped: no step of the build is left running
    assert not sandbox_processes(key)
    if provider == "azure":
        # approved once drained, so Azure may proceed; the neighbour's event was ignored
        assert state.acks == [{"StartRequests": [{"EventId": EVENT_ID}]}]
    if provider == "aws":
        assert "PUT /latest/api/token" in state.requests

    # an ephemeral worker picks it up, builds it, and exits
    rescuer = kiln.start_worker(f"rescuer-{provider}", args=["--max-jobs", "1"])
    final = kiln.wait_build(key, timeout=120)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 1
    assert [a["outcome"] for a in final["attempt_history"]] == ["preempted", "succeeded"]
    assert final["attempt_history"][0]["worker_id"] == victim
    assert rescuer.wait(30) == 0
    shutil.rmtree(cold_cache, ignore_errors=True)


def test_detectors_follow_each_protocol(metadata: tuple[str, MetadataState]) -> None:
    url, state = metadata
    state.reset()
    aws = AwsSpotDetector(url)
    gce, azure = GceDetector(url), AzureDetector(url)
    assert (aws.poll(), gce.poll(), azure.poll()) == (None, None, None)
    with state.lock:
        state.tokens.clear()  # the metadata service restarted: old session tokens are void
        state.preempted = True
    notice = aws.poll()
    assert notice is not None and "terminate" in notice.detail
    assert [r for r in state.requests if r.startswith("PUT")] == ["PUT /latest/api/token"] * 2
    assert gce.poll() == Notice("gce", "instance preempted")
    notice = azure.poll()
    assert notice is not None and notice.event_id == EVENT_ID  # not the neighbour's event
    azure.acknowledge(notice)
    assert state.acks == [{"StartRequests": [{"EventId": EVENT_ID}]}]
    # a server that is not GCE's metadata server (no Metadata-Flavor answer) is not believed
    with pytest.raises(OSError, match="not come from a GCE metadata server"):
        GceDetector(url + "/impostor").poll()


def test_a_worker_started_on_a_reclaimed_instance_takes_nothing(
        kiln: KilnProcesses, metadata: tuple[str, MetadataState]) -> None:
    url, state = metadata
    state.reset()
    with state.lock:
        state.preempted = True
    proc = kiln.start_worker("doomed", env={
        "KILN_WORKER__ID": "doomed", "KILN_WORKER__PREEMPTION__PROVIDERS": "[gce]",
        "KILN_WORKER__PREEMPTION__GCE_URL": url})
    assert proc.wait(30) == 0
    assert "not starting" in kiln.log("doomed")
    assert query(kiln, "SELECT 1 FROM kiln_workers WHERE id = 'doomed'") == []
