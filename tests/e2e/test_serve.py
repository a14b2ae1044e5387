"""``kiln serve``, the README's first command, keeps the service up: each of its children is
killed with SIGKILL in turn and comes back; a build whose worker died still completes
while the API answers; a signal stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.processes import kill_sandbox_processes
from tests.service import REPO, free_port, template_database, wait_for

pytestmark = pytest.mark.slow

ROLES = {"worker": "functions.worker", "janitor": "functions.janitor", "api": "gunicorn"}


def children(pid: int) -> dict[str, int]:
    """Return the pids of a process's children by role (worker, janitor, api)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            for role, marker in ROLES.items():
                if marker.encode() in cmdline:
                    found[role] = int(child)
    return found



def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def serve(tmp_path: Path, pg_server_url: str, pg_template: str,
          proxy_server: gp.ProxyServer) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
        "CONFIG_PATH": "/dev/null",
        "KILN_DATABASE__URL": template_database(pg_server_url, pg_template, "kiln_serve"),
        "KILN_BUILD__GOPROXY": proxy_server.url, "KILN_BUILD__GOSUMDB": "off",
        "KILN_BUILD__SANDBOX": "process",
        # cold caches: the build is still running when its worker is killed
        "KILN_BUILD__CACHE_DIR": str(tmp_path / "cache"),
        "KILN_BUILD__WORK_DIR": str(tmp_path / "work"),
        "KILN_STORAGE__LOCAL__PATH": str(tmp_path / "artifacts"),
        "KILN_SIGNING__GENERATED_KEY_FILE": str(tmp_path / "signing.key"),
        "KILN_API__LISTEN": f"127.0.0.1:{port}", "KILN_API__PROCESSES": "1",
        "KILN_WORKER__LEASE_SECONDS": "5", "KILN_WORKER__HEARTBEAT_SECONDS": "1",
        "KILN_WORKER__POLL_SECONDS": "1", "KILN_JANITOR__REQUEUE_INTERVAL": "1",
        "KILN_SERVE__RESTART_DELAY": "0.5",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kiln")), "serve"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for("the API", lambda: healthy(url))
        yield proc, url, tmp_path / "serve.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_each_child_killed_comes_back_and_a_build_survives_its_worker(
        serve: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, url, log = serve
    first = wait_for("all three children", lambda: len(c := children(proc.pid)) == 3 and c)
    assert isinstance(first, dict)

    os.kill(first["janitor"], signal.SIGKILL)
    wait_for("a new janitor", lambda: children(proc.pid).get("janitor") not in
             (None, first["janitor"]))
    assert healthy(url)

    resp = requests.post(url + "/api/builds", json={
        "os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_LATEST,
        "plugins": [f"{gp.HELLO}@v0.1.0"]}, timeout=30)
    assert resp.status_code == 202, resp.text
    key = resp.json()["key"]
    wait_for("the build to run", lambda: requests.get(
        f"{url}/api/builds/{key}", timeout=5).json()["state"] == "running")
    os.kill(first["worker"], signal.SIGKILL)
    kill_sandbox_processes(key)  # the process sandbox's steps outlive their worker
    answered = 0
    deadline = time.monotonic() + 180
    doc: dict[str, object] = {}
    while time.monotonic() < deadline:
        answered += healthy(url)
        doc = requests.get(f"{url}/api/builds/{key}", timeout=5).json()
        if doc["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert doc["state"] == "succeeded", (doc, log.read_text()[-3000:])
    assert doc["attempts"] == 2  # the killed attempt was lost and requeued
    assert answered > 0
    assert children(proc.pid).get("worker") not in (None, first["worker"])

    os.kill(first["api"], signal.SIGKILL)
    wait_for("a new API", lambda: children(proc.pid).get("api") not in (None, first["api"]))
    # the killed master's worker goes on answering until it notices (about a second), and
    # holds the port meanwhile: the new master binds once it is gone
    wait_for("the new API to listen", lambda: log.read_text().count("Listening at:") == 2,
             timeout=90)
    wait_for("the API to answer again", lambda: healthy(url))
    artifact = requests.get(f"{url}/api/builds/{key}/artifact", timeout=30)
    assert artifact.status_code == 200 and artifact.content.startswith(b"\x7fELF")

    text = log.read_text()
    for role in ("janitor", "worker", "api"):
        assert f"{role} exited with status -9" in text, text[-3000:]
    last = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not [pid for pid in last.values() if Path(f"/proc/{pid}").exists()]


def test_a_crash_loop_stops_kiln_serve_with_an_error(
        tmp_path: Path, pg_server_url: str, pg_template: str) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
        "CONFIG_PATH": "/dev/null",
        "KILN_DATABASE__URL": template_database(pg_server_url, pg_template, "kiln_serve_loop"),
        # a worker that cannot start: the docker sandbox with an image that does not exist
        "KILN_BUILD__SANDBOX": "docker", "KILN_BUILD__DOCKER__IMAGE": "kiln-no-such:image",
        "KILN_BUILD__CACHE_DIR": str(tmp_path / "cache"),
        "KILN_STORAGE__LOCAL__PATH": str(tmp_path / "artifacts"),
        "KILN_SIGNING__GENERATED_KEY_FILE": str(tmp_path / "signing.key"),
        "KILN_API__LISTEN": f"127.0.0.1:{free_port()}", "KILN_API__PROCESSES": "1",
        "KILN_SERVE__RESTART_DELAY": "0.2", "KILN_SERVE__RESTART_LIMIT": "3",
    }
    done = subprocess.run([str(Path(sys.executable).with_name("kiln")), "serve"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "worker exited 4 times within 120s" in done.stderr, done.stderr[-3000:]
    assert "kiln-no-such:image" in done.stderr  # the worker's own reason is in the output
