"""Cancelling builds end to end, with the docker sandbox: queued builds at once, running ones
by their worker through NOTIFY (the sandbox container is removed), recorded as cancelled.

The worker fetches modules from a "proxy" that accepts connections and never answers, so
its first fetch step hangs in its container until the build is cancelled. Its heartbeat is
slow (30 s): only the kiln_cancel notification can stop the build quickly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kiln.worker.sandbox.base import SANDBOX_LABEL
from tests.dockerutil import ensure_sandbox_image
from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses

pytestmark = [pytest.mark.slow, pytest.mark.docker]

#: how long the test waits for things that should take a moment (not a speed target)
PATIENCE = 60.0
#: the worker's heartbeat: the fallback that would also stop a cancelled build
HEARTBEAT_SECONDS = 30


@pytest.fixture(scope="module")
def silent_proxy() -> Iterator[str]:
    """Return the URL of a proxy that takes connections and never answers them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accept(): the kernel completes handshakes, nobody replies
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def kiln_cache_dir(kiln_root: Path) -> Path:
    # an empty module cache, so that the worker must fetch
    return kiln_root / "cache"


@pytest.fixture(scope="module")
def kiln_start(silent_proxy: str) -> Callable[[KilnProcesses], None]:
    # the API resolves versions from the synthetic proxy; the worker fetches from the
    # silent one
    image = ensure_sandbox_image()

    def start(service: KilnProcesses) -> None:
        service.start_worker(env={
            "KILN_BUILD__SANDBOX": "docker",
            "KILN_BUILD__DOCKER__IMAGE": image,
            "KILN_BUILD__DOCKER__NETWORK": "host",
            "KILN_BUILD__GOPROXY": silent_proxy,
            "KILN_WORKER__CONCURRENCY": "1",
            "KILN_WORKER__HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "KILN_WORKER__LEASE_SECONDS": str(HEARTBEAT_SECONDS * 4),
            "KILN_WORKER__POLL_SECONDS": "30",
        })
        service.wait_for_worker(timeout=PATIENCE)
        service.start_api()

    return start


@pytest.fixture(scope="module")
def token(kiln: KilnProcesses) -> str:
    """Return an API key's token: only a build's requester (or an admin) may cancel it."""
    made = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", "create", "ci",
                           "--json"], cwd=REPO, env=kiln.env, capture_output=True,
                          text=True, timeout=60, check=True)
    return str(json.loads(made.stdout)["token"])


def containers_of(key: str) -> list[dict[str, Any]]:
    """Return the sandbox containers of build ``key`` (running or not)."""
    out = subprocess.run(["docker", "ps", "--all", "--no-trunc", "--format", "{{json .}}",
                          "--filter", f"label={SANDBOX_LABEL}={key}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_for(what: str, check: Any, timeout: float = PATIENCE) -> float:
    """Poll ``check`` until true; return how long that took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


def test_cancel_queued_then_running_build(kiln: KilnProcesses, token: str) -> None:
    service = kiln
    auth = {"Authorization": f"Bearer {token}"}

    def post(version: str) -> str:
        resp = service.post_build({"os": "linux", "arch": "amd64", "caddy_version": version},
                                  headers=auth)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["key"])

    def state(key: str) -> dict[str, Any]:
        return dict(requests.get(f"{service.url}/api/builds/{key}", timeout=30).json())

    running = post(gp.CADDY_OLDEST)
    wait_for("the fetch container to start",
             lambda: any(c["State"] == "running" for c in containers_of(running)))
    assert state(running)["state"] == "running"
    # the worker runs one build at a time: the next one waits in the queue
    queued = post(gp.CADDY_LATEST)
    assert state(queued)["state"] == "queued"

    resp = requests.delete(f"{service.url}/api/builds/{queued}", headers=auth, timeout=30)
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert state(queued)["attempt_history"] == []

    resp = requests.delete(f"{service.url}/api/builds/{running}", headers=auth, timeout=30)
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    took = wait_for("the sandbox container's removal", lambda: not containers_of(running))
    print(f"sandbox container removed {took:.2f}s after the cancel was answered")
    # well before the heartbeat could have noticed: the notification stopped it
    assert took < HEARTBEAT_SECONDS / 2
    final = state(running)
    assert final["state"] == "cancelled"
    assert final["error"].startswith("cancelled by key ci")
    assert [a["outcome"] for a in final["attempt_history"]] == ["cancelled"]
    wait_for("the worker's note", lambda: "was cancelled; stopping it" in service.log("worker"))
    # the worker is free again: a new build gets a container of its own
    after = post(gp.CADDY_RELEASES[1])
    wait_for("the next build's container", lambda: bool(containers_of(after)))
    requests.delete(f"{service.url}/api/builds/{after}", headers=auth, timeout=30)
    wait_for("the next build's container removal", lambda: not containers_of(after))
