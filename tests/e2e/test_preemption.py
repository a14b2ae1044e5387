"""Spot preemption end to end: a worker process drains on a real-protocol notice.

A fake instance metadata server on 127.0.0.1 speaks AWS IMDSv2, GCE's metadata server and
Azure Scheduled Events (token, headers, status codes, acknowledgement). A worker with a cold
build cache (a fresh spot instance) claims a build; the notice arrives; the worker stops
its sandbox, hands the build back without spending an attempt, marks itself draining then
gone, and exits 0. An ephemeral worker (``--max-jobs 1``) then completes the build.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from kiln.worker.preemption import AwsSpotDetector, AzureDetector, GceDetector, Notice
from tests.fixtures import goproxy as gp
from tests.processes import sandbox_processes
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow

VM_NAME = "kiln-spot-7"
EVENT_ID = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
AWS_ACTION = {"action": "terminate", "time": "2031-04-01T12:02:00Z"}


class MetadataState:
    """What the fake metadata server answers, and what it was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.preempted = False
        self.tokens: set[str] = set()
        self.acks: list[Any] = []
        self.requests: list[str] = []

    def reset(self) -> None:
        with self.lock:
            self.preempted = False
            self.acks.clear()
            self.requests.clear()


class MetadataHandler(BaseHTTPRequestHandler):
    """The three providers' instance metadata endpoints a spot worker uses."""

    server: MetadataServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        """Stay quiet."""

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> MetadataState:
        state = self.server.state
        with state.lock:
            state.requests.append(f"{self.command} {self.path}")
        return state

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        if self.path != "/latest/api/token":
            self._send(404)
            return
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            self._send(400, b"Missing or invalid ttl-seconds header")
            return
        token = os.urandom(16).hex()
        with state.lock:
            state.tokens.add(token)
        self._send(200, token.encode(), headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        url = urlsplit(self.path)
        if url.path.startswith("/latest/"):
            if self.headers.get("X-aws-ec2-metadata-token") not in state.tokens:
                self._send(401)  # IMDSv2 only: no session token, no answer
            elif url.path == "/latest/meta-data/spot/instance-action" and state.preempted:
                self._send(200, json.dumps(AWS_ACTION).encode(), "text/plain")
            else:
                self._send(404, b"Not Found")
        elif url.path.startswith("/impostor/"):
            self._send(200, b"TRUE")  # any web server, not a metadata server
        elif url.path.startswith("/computeMetadata/v1/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                self._send(403, b"Missing required header: Metadata-Flavor")
            elif url.path == "/computeMetadata/v1/instance/preempted":
                self._send(200, b"TRUE" if state.preempted else b"FALSE",
                           headers={"Metadata-Flavor": "Google"})
            else:
                self._send(404, headers={"Metadata-Flavor": "Google"})
        elif url.path.startswith("/metadata/"):
            if self.headers.get("Metadata") != "true":
                self._send(400, b'{"error":"Bad request. Required metadata header not specified"}',
                           "application/json")
            elif url.path == "/metadata/instance/compute/name":
                self._send(200, VM_NAME.encode())
            elif url.path == "/metadata/scheduledevents" and "api-version=" in url.query:
                self._send(200, json.dumps(self._azure_events(state)).encode(),
                           "application/json")
            else:
                self._send(404)
        else:
            self._send(404)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path != "/metadata/scheduledevents" or self.headers.get("Metadata") != "true":
            self._send(400)
            return
        with state.lock:
            state.acks.append(json.loads(body))
        self._send(200)

    @staticmethod
    def _azure_events(state: MetadataState) -> dict[str, Any]:
        # a neighbour's eviction is always listed; ours once preempted
        events = [_azure_event("0F2B3C4D-0000-4000-8000-000000000001", "other-vm")]
        if state.preempted:
            events.append(_azure_event(EVENT_ID, VM_NAME))
        return {"DocumentIncarnation": 2 if state.preempted else 1, "Events": events}


def _azure_event(event_id: str, vm: str) -> dict[str, Any]:
    return {"EventId": event_id, "EventStatus": "Scheduled", "EventType": "Preempt",
            "ResourceType": "VirtualMachine", "Resources": [vm],
            "NotBefore": "Mon, 01 Apr 2031 12:00:30 GMT", "Description": "",
            "EventSource": "Platform", "DurationInSeconds": -1}


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True
    state: MetadataState


@pytest.fixture(scope="module")
def metadata() -> Iterator[tuple[str, MetadataState]]:
    server = MetadataServer(("127.0.0.1", 0), MetadataHandler)
    server.state = MetadataState()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.state
    finally:
        server.shutdown()
        server.server_close()


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
