"""End to end: infra/compose's whole stack under ``docker compose``, every image built here.

``infra/compose/offline_images.sh`` builds the images without a registry (PostgreSQL from
Debian's packages, moto's S3 behind MinIO's command line, kiln-api, kiln-worker,
kiln-sandbox) and prints the KILN_*_IMAGE variables the compose file reads. The stack runs
from the unchanged compose file, with a small override for what a test needs: the synthetic
module proxy mounted read-only (the fetch steps then have no network), short leases, and
checksum database off. The worker container starts the sandbox containers on this host's
engine, so its data directory (KILN_DATA_DIR) and the proxy are at the same paths inside
and outside.

Through the published ports only, as a user would: a build is submitted, its worker
container is killed mid-build and started again, the build completes; its binary is
downloaded through the API's redirect to a presigned S3 URL and run; PostgreSQL is restarted
under a queued build, which is neither lost nor left behind; the stack is taken down and up
again (volumes kept) and serves the same bytes without building again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kiln.worker.sandbox.base import SANDBOX_LABEL
from tests.dockerutil import REPO, REQUIRE_ENV, docker_required, require_docker
from tests.fixtures import goproxy as gp
from tests.service import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

COMPOSE_DIR = REPO / "infra" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
OFFLINE_IMAGES = COMPOSE_DIR / "offline_images.sh"
#: seconds the offline images may take from nothing (a few when they are current)
IMAGES_TIMEOUT_SECONDS = 900
#: seconds a compose command may take (down waits for the worker to drain)
COMPOSE_TIMEOUT_SECONDS = 180
#: seconds the stack may take to answer on its published ports
UP_SECONDS = 120
#: seconds one build may take, a worker's death and its lease's expiry included
BUILD_SECONDS = 240
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
#: the worker's lease, and how often the janitor looks for expired ones: a killed worker's
#: build goes back to the queue within seconds rather than a minute
LEASE_SECONDS = 10
#: what the worker logs once it has registered (the API refuses builds before: 503)
WORKER_READY = " ready: concurrency"
SPEC_A = {"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
          "plugins": [f"{gp.HELLO}@v0.1.0"]}
SPEC_B = {"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
          "plugins": [f"{gp.HELLO}@v0.2.0"]}


def compose_command() -> list[str]:
    """Return the compose command here (v2 plugin, else docker-compose v1), or skip/fail."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    problem = "neither `docker compose` nor docker-compose is installed"
    if docker_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    pytest.skip(f"{problem}; set {REQUIRE_ENV}=1 to make this a failure")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Build every image of the stack offline; return the variables naming them."""
    require_docker()
    compose_command()
    proc = subprocess.run(["sh", str(OFFLINE_IMAGES)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable),
                          timeout=IMAGES_TIMEOUT_SECONDS, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{OFFLINE_IMAGES} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for name in ("KILN_POSTGRES_IMAGE", "KILN_MINIO_IMAGE", "KILN_MC_IMAGE",
                 "KILN_API_IMAGE", "KILN_WORKER_IMAGE", "KILN_SANDBOX_IMAGE"):
        assert found.get(name), f"{OFFLINE_IMAGES} named no {name}:\n{proc.stdout}"
    return found


@dataclass
class Stack:
    """One compose project of infra/compose, and the ways to reach it."""

    command: list[str]
    project: str
    env_file: Path
    override: Path
    api: str
    s3: str
    keys: set[str] = field(default_factory=set)

    def compose(self, *args: str, timeout: float = COMPOSE_TIMEOUT_SECONDS
                ) -> subprocess.CompletedProcess[str]:
        """Run a compose command on the project; fail with its output if it fails."""
        argv = [*self.command, "--env-file", str(self.env_file), "-p", self.project,
                "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=COMPOSE_DIR,
                              env=_compose_environment(), timeout=timeout, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def container(self, service: str) -> Any:
        """Return the (only) container of ``service``."""
        import docker

        client = docker.from_env(version="auto", timeout=60)
        try:
            found = client.containers.list(all=True, ignore_removed=True, filters={"label": [
                f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]})
        finally:
            client.close()
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "60", timeout=60).stdout
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"

    def wait_api(self, timeout: float = UP_SECONDS) -> None:
        """Wait until /healthz answers 200 (the API reaches PostgreSQL)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                resp = requests.get(f"{self.api}/healthz", timeout=5)
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text[:200]}"
            except requests.RequestException as exc:
                last = str(exc)
            time.sleep(0.5)
        raise AssertionError(f"the API did not answer within {timeout}s: {last}")

    def wait_worker(self, timeout: float = UP_SECONDS) -> None:
        """Wait until the worker container says it is ready (the API takes builds then)."""
        deadline = time.monotonic() + timeout
        container = self.container("worker")
        while time.monotonic() < deadline:
            if WORKER_READY in container.logs().decode(errors="replace"):
                return
            time.sleep(0.5)
        raise AssertionError(f"the worker did not get ready within {timeout}s")

    def submit(self, spec: dict[str, Any]) -> str:
        resp = requests.post(f"{self.api}/api/builds", json=spec, timeout=30)
        assert resp.status_code in (200, 202), resp.text
        key = str(resp.json()["key"])
        self.keys.add(key)
        return key

    def build(self, key: str) -> dict[str, Any]:
        resp = self.get(f"/api/builds/{key}", timeout=10)
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET from the API as a client that retries "try again shortly" (503) would.

        After PostgreSQL restarts (or the stack comes up), each API process finds its pooled
        connections broken on first use, and one that found the database unreachable
        answers 503 at once for a moment (kiln/db/pool.py): /healthz answering in one process
        does not mean every process has reconnected.
        """
        deadline = time.monotonic() + UP_SECONDS
        while True:
            resp = requests.get(f"{self.api}{path}", **kwargs)
            if resp.status_code != 503 or time.monotonic() > deadline:
                return resp
            time.sleep(0.5)

    def wait_build(self, key: str, timeout: float = BUILD_SECONDS) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.build(key)
            if doc["state"] in ("succeeded", "failed", "cancelled"):
                return doc
            time.sleep(0.5)
        raise AssertionError(f"build {key} still {doc.get('state')} after {timeout}s")

    def log(self, key: str) -> str:
        """Return a build's whole log as the API serves it."""
        resp = self.get(f"/api/builds/{key}/log", timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.text

    def download(self, key: str) -> bytes:
        """Fetch the artifact as a client does: the API's redirect, then the store."""
        resp = self.get(f"/api/builds/{key}/artifact", allow_redirects=False, timeout=30)
        assert resp.status_code == 302, f"{resp.status_code} {resp.text[:300]}"
        location = resp.headers["Location"]
        # presigned by the API for the address clients reach the store at, not the
        # compose network's http://minio:9000
        assert location.startswith(f"{self.s3}/kiln/"), location
        stored = requests.get(location, timeout=60)
        assert stored.status_code == 200, f"{stored.status_code} {stored.text[:300]}"
        return stored.content


def _compose_environment() -> dict[str, str]:
    """This process's environment without the variables the compose file reads.

    The test's env file alone decides them (a developer's shell may set KILN_PORT...).
    """
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    return {k: v for k, v in os.environ.items()
            if k not in names and not k.startswith("COMPOSE_")}


def _readable_copy(source: Path, target: Path) -> Path:
    """Copy the proxy where the API's user (10001) and the sandbox's (1000) can read it."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return target


def _remove_sandboxes(keys: set[str]) -> None:
    """Remove sandbox containers of these builds (a killed worker leaves its step's)."""
    import docker

    client = docker.from_env(version="auto", timeout=60)
    try:
        for key in keys:
            for container in client.containers.list(all=True, ignore_removed=True,
                filters={"label": f"{SANDBOX_LABEL}={key}"}):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(images: dict[str, str], proxy_dir: Path) -> Iterator[Stack]:
    command = compose_command()
    # under /tmp, not pytest's private tmp dir: the engine and the containers' users
    # (sandbox 1000, API 10001) reach it at the same path
    root = Path(tempfile.mkdtemp(prefix="kiln-compose-"))
    root.chmod(0o755)
    proxy = _readable_copy(proxy_dir, root / "goproxy")
    api_port, s3_port = free_port(), free_port()
    env = {
        **images,
        "POSTGRES_PASSWORD": uuid.uuid4().hex,
        "MINIO_ROOT_USER": "kiln",
        "MINIO_ROOT_PASSWORD": uuid.uuid4().hex,
        "KILN_PORT": str(api_port),
        "KILN_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "KILN_S3_PORT": str(s3_port),
        "KILN_S3_PUBLIC_URL": f"http://127.0.0.1:{s3_port}",
        "KILN_DATA_DIR": str(root / "data"),
        "KILN_WORKER_CONCURRENCY": "1",
        "KILN_GOPROXY": f"file://{proxy}",
        "KILN_SIGNING_KEY": "",
    }
    env_file = root / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    proxy_mount = f"{proxy}:{proxy}:ro"
    settings = {"KILN_WORKER__LEASE_SECONDS": str(LEASE_SECONDS),
                "KILN_WORKER__HEARTBEAT_SECONDS": "2",
                "KILN_WORKER__POLL_SECONDS": "1",
                "KILN_JANITOR__REQUEUE_INTERVAL": "1",
                # a synthetic proxy: its modules are in no checksum database
                "KILN_BUILD__GOSUMDB": "off",
                "KILN_LOGGING__LEVEL": "DEBUG"}
    override = root / "compose.test.yml"
    override.write_text(yaml.safe_dump({"services": {
        # the API resolves versions from the proxy too
        "api": {"volumes": [proxy_mount], "environment": settings},
        "worker": {"volumes": [proxy_mount], "environment": settings},
        "janitor": {"volumes": [proxy_mount], "environment": settings},
    }}))
    stack = Stack(command=command, project=f"kiln-e2e-{uuid.uuid4().hex[:8]}",
                  env_file=env_file, override=override, api=f"http://127.0.0.1:{api_port}",
                  s3=f"http://127.0.0.1:{s3_port}")
    try:
        try:
            stack.compose("up", "-d")
            stack.wait_api()
            stack.wait_worker()
        except AssertionError as exc:
            pytest.fail(f"the stack did not come up: {exc}\n\n--- compose logs ---\n"
                        f"{stack.logs()}", pytrace=False)
        yield stack
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        _remove_sandboxes(stack.keys)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def explained(stack: Stack) -> Iterator[None]:
    """Add the services' last log lines to a failure."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n\n--- compose logs ---\n{stack.logs()}") from exc


def _run_caddy(binary: bytes, where: Path) -> str:
    path = where / "caddy"
    path.write_bytes(binary)
    path.chmod(0o755)
    return subprocess.run([str(path), "list-modules", "--versions"], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def _wait_for_step(key: str, timeout: float = 60) -> Any:
    """Wait until a sandbox container of build ``key`` exists (a step is under way); return it."""
    import docker

    client = docker.from_env(version="auto", timeout=60)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = client.containers.list(all=True, ignore_removed=True,
                filters={"label": f"{SANDBOX_LABEL}={key}"})
            if found:
                return found[0]
            time.sleep(0.1)
    finally:
        client.close()
    raise AssertionError(f"no sandbox container of {key} within {timeout}s")


def test_compose_stack_builds_serves_and_survives_faults(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    with explained(stack):
        # 1. a build; its worker container dies mid-build and comes back
        key_a = stack.submit(SPEC_A)
        worker = stack.container("worker")
        step = _wait_for_step(key_a)
        assert stack.build(key_a)["state"] == "running"
        # started by the worker container on this engine; a file:// proxy alone: no network
        assert step.attrs["HostConfig"]["NetworkMode"] == "none", step.attrs["HostConfig"]
        worker.kill()
        worker.wait(timeout=30)
        worker.start()
        done_a = stack.wait_build(key_a)
        assert done_a["state"] == "succeeded", done_a
        history = done_a["attempt_history"]
        assert [a["outcome"] for a in history][0] == "lost", history
        assert history[-1]["outcome"] == "succeeded", history
        assert history[0]["worker_id"] != history[-1]["worker_id"], history

        # 2. the binary, through the presigned redirect, runs with its plugin
        binary_a = stack.download(key_a)
        assert hashlib.sha256(binary_a).hexdigest() == done_a["artifact"]["sha256"]
        assert f"{gp.HELLO_ID} v0.1.0" in _run_caddy(binary_a, tmp_path)

        # 3. PostgreSQL restarts under a queued build (the worker frozen meanwhile); the
        # other services reconnect rather than die
        survivors = {name: stack.container(name).attrs["State"]["StartedAt"]
                     for name in ("api", "janitor", "worker")}
        worker = stack.container("worker")
        worker.pause()
        try:
            key_b = stack.submit(SPEC_B)
            assert stack.build(key_b)["state"] == "queued"
            stack.compose("restart", "postgres")
            stack.wait_api()
            assert stack.build(key_b)["state"] == "queued"
        finally:
            worker.unpause()
        done_b = stack.wait_build(key_b)
        assert done_b["state"] == "succeeded", done_b
        for name, started_at in survivors.items():
            state = stack.container(name).attrs["State"]
            assert (state["Status"], state["StartedAt"]) == ("running", started_at), (
                f"{name} was restarted: {state}")
        assert f"{gp.HELLO_ID} v0.2.0" in _run_caddy(stack.download(key_b), tmp_path)

        # 4. down and up again, volumes kept: served as before, nothing built again
        logs = {key: stack.log(key) for key in (key_a, key_b)}
        assert all("go build" in text for text in logs.values()), logs
        stack.compose("down", "--timeout", "30")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{stack.api}/healthz", timeout=5)
        stack.compose("up", "-d")
        stack.wait_api()
        for key, done, binary in ((key_a, done_a, binary_a), (key_b, done_b, None)):
            again = stack.build(key)
            assert again["state"] == "succeeded"
            assert again["attempt_history"] == done["attempt_history"]
            served = stack.download(key)
            assert hashlib.sha256(served).hexdigest() == done["artifact"]["sha256"]
            if binary is not None:
                assert served == binary
            assert stack.log(key) == logs[key]  # the build's log is kept too

        # 5. the same plugins for another platform: the module set the first build shared
        # (in MinIO, under modcache/sets/) gives go.mod and go.sum; no fetch step runs
        key_c = stack.submit({**SPEC_A, "arch": "arm64"})
        done_c = stack.wait_build(key_c)
        assert done_c["state"] == "succeeded", done_c
        log_c = stack.log(key_c)
        assert "fetch steps skipped" in log_c and "go get" not in log_c, log_c
    print(f"compose stack test: {time.monotonic() - started:.1f}s after the stack was up")
