"""End to end: the worker service image runs a build through the host's Docker Engine.

The images are built here without a registry (worker_image/service_images.sh FROM the
offline kiln-python-base:3.11). The worker container talks to the host's engine through
the mounted socket and starts kiln-sandbox containers for the build steps; it reaches a
real PostgreSQL over TCP (started for this module, on 127.0.0.1, with the container on the
host network), as it would reach RDS. The API runs on the host (gunicorn). Work, cache,
artifact and proxy directories are mounted at the same paths inside as outside, because
the engine resolves the sandbox's bind mounts on the host.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from kiln.db.migrate import Migrator, load_migrations
from tests.dockerutil import REPO, ensure_sandbox_image, require_docker
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SERVICE_IMAGES = REPO / "worker_image" / "service_images.sh"
WORKER_IMAGE = "kiln-worker:latest"
#: seconds the offline base and the two service images may take to build
IMAGES_TIMEOUT_SECONDS = 600
#: the system user pgserver runs postgres as when the tests run as root
PG_SYSTEM_USER = "pgserver"


def _docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"


@pytest.fixture(scope="module")
def worker_image() -> str:
    require_docker()
    ensure_sandbox_image()
    proc = subprocess.run(["sh", str(SERVICE_IMAGES)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable),
                          timeout=IMAGES_TIMEOUT_SECONDS, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{SERVICE_IMAGES} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return WORKER_IMAGE


@pytest.fixture(scope="module")
def tcp_postgres() -> Iterator[str]:
    """Run a PostgreSQL that listens on 127.0.0.1 (pgserver's binaries); yield its URL."""
    import pgserver
    from pgserver.utils import ensure_user_exists

    bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    root = Path(tempfile.mkdtemp(prefix="kiln-tcp-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    user: str | None = None
    if os.geteuid() == 0:
        # postgres refuses to run as root
        user = PG_SYSTEM_USER
        ensure_user_exists(user)
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    port = free_port()
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                    "--encoding=utf8"], user=user, check=True, capture_output=True, timeout=120)
    log = data / "server.log"
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(log),
                    "-o", f"-h 127.0.0.1 -p {port} -k {data}", "start"],
                   user=user, check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       user=user, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def kiln_db(tcp_postgres: str) -> str:
    with psycopg.connect(tcp_postgres, autocommit=True) as conn:
        Migrator(conn).migrate()
    return tcp_postgres


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # under /tmp, not pytest's private tmp dir: the sandbox user (uid 1000) and the engine
    # must reach it by the same path
    path = Path(tempfile.mkdtemp(prefix="kiln-worker-container-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def readable_proxy(root: Path, proxy_dir: Path) -> Path:
    """Return a copy of the synthetic proxy the sandbox user can read (pytest's tmp is 0700)."""
    copy = root / "goproxy"
    shutil.copytree(proxy_dir, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return copy


@pytest.fixture(scope="module")
def container_env(kiln_db: str, root: Path, readable_proxy: Path, go_cache_dir: Path
                  ) -> dict[str, str]:
    return {
        "KILN_DATABASE__URL": kiln_db,
        "KILN_BUILD__SANDBOX": "docker",
        "KILN_BUILD__GOPROXY": f"file://{readable_proxy}",
        "KILN_BUILD__GOSUMDB": "off",
        "KILN_BUILD__CACHE_DIR": str(go_cache_dir),
        "KILN_BUILD__WORK_DIR": str(root / "work"),
        "KILN_STORAGE__LOCAL__PATH": str(root / "artifacts"),
        "KILN_WORKER__ID": f"container-{uuid.uuid4().hex[:8]}",
        "KILN_WORKER__CONCURRENCY": "1",
        "KILN_WORKER__POLL_SECONDS": "1",
        "KILN_WORKER__HEARTBEAT_SECONDS": "2",
        "KILN_WORKER__LEASE_SECONDS": "30",
        "KILN_LOGGING__LEVEL": "DEBUG",
    }


@pytest.fixture(scope="module")
def worker(worker_image: str, container_env: dict[str, str], root: Path,
           go_cache_dir: Path) -> Iterator[Any]:
    import docker

    client = docker.from_env(version="auto", timeout=60)
    for name in ("work", "artifacts"):
        (root / name).mkdir(exist_ok=True)
    same_path = {str(p): {"bind": str(p), "mode": "rw"} for p in (root, go_cache_dir)}
    container = client.containers.run(
        worker_image, detach=True, network_mode="host", environment=container_env,
        name=f"kiln-test-worker-{uuid.uuid4().hex[:8]}",
        volumes={
            _docker_socket(): {"bind": "/var/run/docker.sock", "mode": "rw"},
            **same_path,
        },
    )
    try:
        deadline = time.monotonic() + 60
        while " ready: concurrency" not in container.logs().decode(errors="replace"):
            container.reload()
            if container.status == "exited" or time.monotonic() > deadline:
                pytest.fail("the worker container did not start:\n"
                            + container.logs().decode(errors="replace"), pytrace=False)
            time.sleep(0.2)
        yield container
    finally:
        container.stop(timeout=20)
        container.remove(force=True)
        client.close()


@pytest.fixture(scope="module")
def api(kiln_db: str, root: Path, readable_proxy: Path, go_cache_dir: Path, worker: Any
        ) -> Iterator[KilnProcesses]:
    service = KilnProcesses(db_url=kiln_db, root=root / "api",
                            goproxy=f"file://{readable_proxy}",
                            cache_dir=go_cache_dir,
                            env={"KILN_STORAGE__LOCAL__PATH": str(root / "artifacts")})
    try:
        service.start_api()
        yield service
    finally:
        service.close()


def test_worker_container_builds_through_the_host_engine(
        api: KilnProcesses, worker: Any, container_env: dict[str, str], tmp_path: Path) -> None:
    resp = api.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
                           "plugins": [f"{gp.HELLO}@v0.1.0"]})
    assert resp.status_code in (200, 202), resp.text
    doc = resp.json()
    # the key names the toolchain of the live worker: the container's docker sandbox
    assert str(doc["sandbox"]).startswith("docker:"), doc
    final = api.wait_build(doc["key"], timeout=600)
    logs = worker.logs().decode(errors="replace")
    assert final["state"] == "succeeded", f"{final}\nworker log:\n{logs[-4000:]}"
    detail = requests.get(f"{api.url}/api/builds/{doc['key']}", timeout=10).json()
    assert {a["worker_id"] for a in detail["attempt_history"]} == {
        container_env["KILN_WORKER__ID"]}

    binary = tmp_path / "caddy"
    download = requests.get(f"{api.url}/api/builds/{doc['key']}/artifact", timeout=60)
    assert download.status_code == 200, download.text
    binary.write_bytes(download.content)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    out = subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert f"{gp.HELLO_ID} v0.1.0" in out

    # no sandbox container outlives its step
    import docker

    client = docker.from_env(version="auto")
    try:
        assert client.containers.list(all=True, ignore_removed=True,
            filters={"label": f"dev.kiln.sandbox={doc['key']}"}) == []
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("image", [WORKER_IMAGE, "kiln-api:latest"])
def test_kiln_migrate_in_the_service_image_builds_the_schema(
        worker_image: str, tcp_postgres: str, image: str) -> None:
    """The images install the package: its migrations must be in it, not in the checkout."""
    import docker

    name = f"kiln_image_migrate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(tcp_postgres, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = tcp_postgres.rsplit("/", 1)[0] + f"/{name}"
    client = docker.from_env(version="auto", timeout=60)
    try:
        output = client.containers.run(
            image, ["kiln", "migrate"], network_mode="host", remove=True,
            environment={"KILN_DATABASE__URL": url, "CONFIG_PATH": "/dev/null"},
        ).decode(errors="replace")
    finally:
        client.close()
    with psycopg.connect(url) as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM kiln_migrations ORDER BY name")]
        has_builds = conn.execute("SELECT to_regclass('kiln_builds') IS NOT NULL").fetchone()
    assert applied == [m.name for m in load_migrations()], output
    assert has_builds == (True,)
