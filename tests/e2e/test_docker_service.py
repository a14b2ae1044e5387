"""The production paths end to end through the docker sandbox, on one running service.

Real gunicorn, worker and janitor processes, the real Docker Engine (every build step in
the sandbox image), the synthetic module proxy as a ``file://`` tree, and a PostgreSQL
server of the module's own, so that it can be restarted under the service. One service
serves every check, in order:

- a build through caddyserver.com's ``/api/download``, held until it is built, served and
  runnable;
- its signature verifies with ``openssl`` against the key ``/api/signing-key`` publishes;
- a worker killed with SIGKILL in the middle of a step: the lease expires, a new worker
  removes the dead one's containers and builds it;
- a preemption notice (SIGUSR1) in the middle of a step: the build is handed back without
  spending an attempt and another worker builds it;
- PostgreSQL stopped and started in the middle of a step: the build still completes.

After each, no sandbox container of the build is left (containers carry Kiln's labels).
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from kiln.db.migrate import Migrator
from kiln.worker.sandbox.base import SANDBOX_LABEL
from tests.dockerutil import ensure_sandbox_image, readable_by_sandbox
from tests.fixtures import goproxy as gp
from tests.processes import PgCluster, own_cluster
from tests.service import KilnProcesses, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]

RUN = uuid.uuid4().hex[:8]
#: the worker ids of this module: their containers are labelled with them
FIRST = f"kiln-test-dsvc-{RUN}"
VICTIM = f"kiln-test-dsvc-victim-{RUN}"
SPOT = f"kiln-test-dsvc-spot-{RUN}"
RESCUER = f"kiln-test-dsvc-rescuer-{RUN}"
LEASE_SECONDS = 5  # tests/service.py's worker lease


@pytest.fixture(scope="module")
def image() -> str:
    return ensure_sandbox_image()


@pytest.fixture(scope="module")
def engine(image: str) -> Iterator[Any]:
    from kiln.worker.sandbox.docker_engine import docker_client

    client = docker_client(required=True)
    assert client is not None
    yield client
    client.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """A PostgreSQL server of the module's own: one test restarts it."""
    with own_cluster("kiln-docker-service-") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kiln_db(pg: PgCluster) -> str:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        Migrator(conn).migrate()
    return pg.url


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the synthetic proxy, readable by the sandbox user (uid 1000)."""
    return readable_by_sandbox(gp.generate(tmp_path_factory.mktemp("docker-service-proxy")))


@pytest.fixture(scope="module")
def kiln_goproxy(proxy: Path) -> str:
    return f"file://{proxy}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The workers' signing key (made by openssl) and its public half."""
    root = tmp_path_factory.mktemp("docker-service-keys")
    private, public = root / "signing.pem", root / "public.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(private))
    openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
    return {"private": private, "public": public}


@pytest.fixture(scope="module")
def kiln_env(image: str, keys: dict[str, Path]) -> dict[str, str]:
    return {
        "KILN_BUILD__SANDBOX": "docker",
        "KILN_BUILD__DOCKER__IMAGE": image,
        # a file:// proxy needs no network: the fetch steps get none, the proxy mounted
        "KILN_BUILD__DOCKER__NETWORK": "none",
        "KILN_WORKER__CONCURRENCY": "1",
        "KILN_SIGNING__KEY_FILE": str(keys["private"]),
        # expired leases are requeued within a second
        "KILN_JANITOR__REQUEUE_INTERVAL": "1",
    }


def start_service(service: KilnProcesses) -> None:
    """Start a docker worker, then the janitor and the API."""
    service.start_worker(env={"KILN_WORKER__ID": FIRST})
    service.wait_for_worker(timeout=120)
    service.start_janitor()
    service.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_service


# helpers ---------------------------------------------------------------------------------


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, check=check, timeout=60)


def query(kiln: KilnProcesses, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(kiln.db_url) as conn:
        return conn.execute(sql, params or {}).fetchall()


def containers_of_build(engine: Any, key: str) -> list[str]:
    """Return the sandbox containers of build ``key`` that exist (running or not)."""
    found = engine.containers.list(all=True, ignore_removed=True,
        filters={"label": f"{SANDBOX_LABEL}={key}"})
    return [f"{c.name} ({c.status})" for c in found]


def no_container_left(engine: Any, key: str) -> None:
    """Wait until build ``key`` has no sandbox container (the engine removes one at a time)."""
    left: list[str] = []

    def gone() -> bool:
        left[:] = containers_of_build(engine, key)
        return not left

    try:
        wait_for(f"the sandbox containers of {key} to be removed", gone, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: still there: {left}") from None


def run_binary(path: Path, *args: str) -> str:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def submit(kiln: KilnProcesses, body: dict[str, Any]) -> str:
    resp = kiln.post_build({"os": "linux", "arch": "amd64", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["key"])


def wait_for_a_step(kiln: KilnProcesses, engine: Any, key: str, worker_id: str) -> None:
    """Wait until ``worker_id`` runs build ``key`` and one of its steps is in a container."""
    wait_for(f"{worker_id} to claim {key}", lambda: query(
        kiln, "SELECT 1 FROM kiln_builds WHERE key = %(k)s AND worker_id = %(w)s "
              "AND state = 'running'", {"k": key, "w": worker_id}), timeout=60)
    wait_for(f"a sandbox container of {key}", lambda: containers_of_build(engine, key),
             timeout=60, interval=0.05)


def start_worker(kiln: KilnProcesses, name: str, worker_id: str) -> subprocess.Popen[bytes]:
    proc = kiln.start_worker(name, env={"KILN_WORKER__ID": worker_id})
    kiln.wait_for_worker(name, timeout=120)
    return proc


def only_worker(kiln: KilnProcesses, name: str, worker_id: str) -> subprocess.Popen[bytes]:
    """Stop every worker process of the module, then start one: it alone claims."""
    for other, proc in list(kiln.procs.items()):
        if other not in ("api", "janitor") and proc.poll() is None:
            kiln.stop(other)
    return start_worker(kiln, name, worker_id)


def outcomes(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["outcome"], a["worker_id"]) for a in doc["attempt_history"]]


# the checks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloaded(kiln: KilnProcesses, engine: Any, image: str,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A binary fetched the way ``caddy upgrade`` does: one held GET of /api/download."""
    params = [("os", "linux"), ("arch", "amd64"), ("version", "v2.8.0"),
              ("p", f"{gp.HELLO}@v0.1.0")]
    resp = requests.get(kiln.url + "/api/download", params=params, timeout=600)
    assert resp.status_code == 200, (resp.text, kiln.log("worker")[-3000:])
    assert "caddy_linux_amd64_custom" in resp.headers["Content-Disposition"], resp.headers
    doc = kiln.wait_build(resp.headers["X-Kiln-Build-Key"], timeout=10)
    root = tmp_path_factory.mktemp("docker-service-download")
    binary = root / "caddy"
    binary.write_bytes(resp.content)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return {"doc": doc, "binary": binary, "dir": root,
            "sandbox": f"docker:{engine.images.get(image).id}"}


def test_compat_download_is_built_in_docker_served_and_runnable(
        downloaded: dict[str, Any], engine: Any) -> None:
    doc, binary = downloaded["doc"], downloaded["binary"]
    assert doc["state"] == "succeeded"
    assert doc["sandbox"] == downloaded["sandbox"]
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == doc["artifact"]["sha256"]
    assert run_binary(binary, "version").startswith("v2.8.0")
    assert gp.HELLO_ID in run_binary(binary, "list-modules")
    no_container_left(engine, doc["key"])


def test_the_artifact_signature_verifies(kiln: KilnProcesses, downloaded: dict[str, Any],
                                         keys: dict[str, Path]) -> None:
    doc, root = downloaded["doc"], downloaded["dir"]
    published = requests.get(kiln.url + "/api/signing-key?format=pem", timeout=10)
    assert published.status_code == 200
    assert published.text == keys["public"].read_text()
    (root / "published.pem").write_text(published.text)
    sig = requests.get(kiln.url + doc["links"]["signature"], timeout=30)
    assert sig.status_code == 200 and len(sig.content) == 64
    (root / "caddy.sig").write_bytes(sig.content)
    verify = ["pkeyutl", "-verify", "-pubin", "-inkey", str(root / "published.pem"),
              "-rawin", "-sigfile", str(root / "caddy.sig")]
    ok = openssl(*verify, "-in", str(downloaded["binary"]), check=False)
    assert ok.returncode == 0 and b"Signature Verified Successfully" in ok.stdout, ok
    tampered = bytearray(downloaded["binary"].read_bytes())
    tampered[1000] ^= 0x01
    (root / "tampered").write_bytes(bytes(tampered))
    assert openssl(*verify, "-in", str(root / "tampered"), check=False).returncode != 0


def test_a_worker_killed_mid_step_is_replaced_and_leaves_no_container(
        kiln: KilnProcesses, engine: Any, tmp_path: Path) -> None:
    victim = only_worker(kiln, "victim", VICTIM)
    key = submit(kiln, {"caddy_version": gp.CADDY_OLDEST, "plugins": [gp.DNS_PACKAGE]})
    wait_for_a_step(kiln, engine, key, VICTIM)

    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    # a new worker on this host removes the dead one's containers before it claims
    start_worker(kiln, "after-kill", FIRST)
    final = kiln.wait_build(key, timeout=300)
    assert final["state"] == "succeeded", (final, kiln.log("after-kill")[-3000:])
    assert outcomes(final) == [("lost", VICTIM), ("succeeded", FIRST)]
    assert final["attempts"] == 2
    no_container_left(engine, key)
    binary = kiln.download(final, tmp_path / "caddy")
    assert gp.DNS_ID in run_binary(binary, "list-modules")


def test_a_preempted_worker_hands_its_build_back_and_it_completes_elsewhere(
        kiln: KilnProcesses, engine: Any) -> None:
    spot = only_worker(kiln, "spot", SPOT)
    key = submit(kiln, {"caddy_version": gp.CADDY_LATEST, "plugins": [f"{gp.HELLO}@v0.2.0"]})
    wait_for_a_step(kiln, engine, key, SPOT)

    os.kill(spot.pid, signal.SIGUSR1)  # the notice a spot instance's worker acts on
    assert spot.wait(60) == 0, kiln.log("spot")[-3000:]
    # handed back without spending an attempt, its sandbox stopped and removed
    assert query(kiln, "SELECT state, attempts, worker_id FROM kiln_builds "
                       "WHERE key = %(k)s", {"k": key}) == [("queued", 0, None)]
    no_container_left(engine, key)

    start_worker(kiln, "rescuer", RESCUER)
    final = kiln.wait_build(key, timeout=300)
    assert final["state"] == "succeeded", (final, kiln.log("rescuer")[-3000:])
    assert outcomes(final) == [("preempted", SPOT), ("succeeded", RESCUER)]
    assert final["attempts"] == 1
    no_container_left(engine, key)


def test_a_database_restart_mid_step_does_not_lose_the_build(
        kiln: KilnProcesses, engine: Any, pg: PgCluster, tmp_path: Path) -> None:
    only_worker(kiln, "steady", FIRST)
    key = submit(kiln, {"caddy_version": "v2.8.4", "plugins": [gp.DNS_PACKAGE]})
    wait_for_a_step(kiln, engine, key, FIRST)

    pg.stop()
    try:
        # the step goes on in its container while the API says the database is gone
        wait_for("/healthz to report the outage", lambda: requests.get(
            kiln.url + "/healthz", timeout=30).status_code == 503, timeout=30)
    finally:
        pg.start()
    kiln.wait_healthy(timeout=60)
    final = kiln.wait_build(key, timeout=300)
    assert final["state"] == "succeeded", (final, kiln.log("steady")[-3000:])
    assert final["attempt_history"][-1]["outcome"] == "succeeded"
    no_container_left(engine, key)
    binary = kiln.download(final, tmp_path / "caddy")
    assert run_binary(binary, "version").startswith("v2.8.4")
    for name in ("api", "janitor", "steady"):
        assert kiln.procs[name].poll() is None, f"{name} died:\n{kiln.log(name)[-3000:]}"
