"""End to end through the docker sandbox: a Kiln whose worker builds in containers.

Real gunicorn, worker and PostgreSQL; the worker (root here, as in production's worker
container) runs every step in the sandbox image as uid 1000, fetching from the synthetic
proxy as a ``file://`` URL bind-mounted read-only into steps that have no network at all.
A user submits a build, downloads it and runs it. Then a worker with a tight compile
timeout meets a plugin that takes the compiler minutes: the build fails after its retry
with the reason, no container is left, and the same worker builds the next request.

Which sandbox ``build.sandbox`` picks (``auto``: docker only when the engine answers and
the image is there) is checked here too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kiln.config import BuildConfig, DockerSandboxConfig
from kiln.wiring import make_sandbox
from kiln.worker.sandbox.base import SANDBOX_LABEL, SandboxError
from kiln.worker.sandbox.process import ProcessSandbox
from tests.dockerutil import ensure_sandbox_image, readable_by_sandbox
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

#: labels the worker puts on its containers (kiln/worker/sandbox/docker.py's WORKER_LABEL)
WORKER_LABEL = "dev.kiln.worker"
RUN = uuid.uuid4().hex[:8]
WORKER_ID = f"kiln-test-docker-{RUN}"
TIGHT_WORKER_ID = f"kiln-test-docker-tight-{RUN}"
#: the tight worker's compile timeout: many times what a warm compile of a small plugin
#: takes in the sandbox, far below what the slow plugin needs
TIGHT_COMPILE_TIMEOUT = 10
MAX_ATTEMPTS = 2
#: the uid a root test runner drops to, to play an unprivileged worker
NOBODY = 65534

SLOW = "github.com/kiln-fixtures/slowcompile"
SLOW_VERSION = "v1.0.0"
SLOW_ID = "http.handlers.slowcompile"
#: statements and live variables of the slow plugin's one function: register allocation
#: grows with their product, so it compiles for minutes (over 25 s on a fast machine) in
#: a few hundred megabytes; a compiler does not run plugin code, but it can be kept busy
SLOW_STATEMENTS = 40000
SLOW_VARIABLES = 400


def slow_plugin_source() -> str:
    """Return a plugin package whose one function takes the Go compiler minutes."""
    v = SLOW_VARIABLES
    lines = [
        "// Package slowcompile registers a module whose Mix takes the compiler minutes.",
        "package slowcompile",
        "",
        f'import "{gp.CADDY}"',
        "",
        "func init() {",
        "\tcaddy.RegisterModule(caddy.ModuleInfo{",
        f'\t\tID:  "{SLOW_ID}",',
        "\t\tNew: func() any { return new(Module) },",
        "\t})",
        "}",
        "",
        "// Module is the Caddy module this plugin registers.",
        "type Module struct{}",
        "",
        "// Mix keeps hundreds of values live across tens of thousands of statements.",
        "func Mix(x []uint64) uint64 {",
    ]
    lines += [f"\tv{k} := x[{k}]" for k in range(v)]
    for j in range(SLOW_STATEMENTS):
        a, b, c = j % v, (j * 7 + 3) % v, (j * 13 + 5) % v
        lines.append(f"\tv{a} = v{b}*{j % 9973 + 3} ^ v{c}>>{j % 7 + 1}")
        if j % 50 == 0:
            lines.append(f"\tif v{a}&1 == 0 {{\n\t\tv{b}++\n\t}}")
    lines.append("\treturn " + " ^ ".join(f"v{k}" for k in range(v)))
    lines.append("}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def image() -> str:
    return ensure_sandbox_image()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a proxy uid 1000 can read: the synthetic one plus the slow plugin."""
    root = tmp_path_factory.mktemp("docker-proxy")
    gp.generate(root)
    gomod = f"module {SLOW}\n\ngo {gp.GO_DIRECTIVE}\n\nrequire {gp.CADDY} {gp.CADDY_OLDEST}\n"
    gp.publish(root, SLOW, SLOW_VERSION, files={"go.mod": gomod, "slow.go": slow_plugin_source()})
    return readable_by_sandbox(root)


@pytest.fixture(scope="module")
def kiln_goproxy(proxy: Path) -> str:
    return f"file://{proxy}"


@pytest.fixture(scope="module")
def kiln_env(image: str) -> dict[str, str]:
    return {
        "KILN_BUILD__SANDBOX": "docker",
        "KILN_BUILD__DOCKER__IMAGE": image,
        # a file:// proxy needs no network: the fetch step gets none, the proxy mounted
        "KILN_BUILD__DOCKER__NETWORK": "none",
        "KILN_WORKER__CONCURRENCY": "1",
        "KILN_WORKER__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }


def start_named_worker(service: KilnProcesses) -> None:
    """Start a worker with a known id (its containers are labelled with it), then the API."""
    service.start_worker(env={"KILN_WORKER__ID": WORKER_ID})
    service.wait_for_worker(timeout=120)
    service.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_named_worker


def containers_of(client: Any, worker_id: str) -> list[str]:
    """Return the names of the sandbox containers a worker started that still exist."""
    found = client.containers.list(all=True, ignore_removed=True,
        filters={"label": [SANDBOX_LABEL, f"{WORKER_LABEL}={worker_id}"]})
    return [c.name for c in found]


@pytest.fixture(scope="module")
def client(image: str) -> Iterator[Any]:
    from kiln.worker.sandbox.docker_engine import docker_client

    engine = docker_client(required=True)
    assert engine is not None
    yield engine
    engine.close()



def modules_of(binary: Path) -> dict[str, str]:
    out = subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return found


def submit(kiln: KilnProcesses, plugins: list[str]) -> str:
    resp = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
                            "plugins": plugins})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["key"])


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_build_in_docker_download_and_run(kiln: KilnProcesses, client: Any, image: str,
                                          tmp_path: Path) -> None:
    key = submit(kiln, [f"{gp.HELLO}@v0.1.0", gp.DNS_PACKAGE])
    final = kiln.wait_build(key)
    assert final["state"] == "succeeded", (final, kiln.log("worker")[-3000:])
    # built in the sandbox image: its id is part of the spec, hence of the key
    assert final["sandbox"] == f"docker:{client.images.get(image).id}"
    binary = kiln.download(final, tmp_path / "caddy")
    modules = modules_of(binary)
    assert modules[gp.HELLO_ID] == "v0.1.0"
    assert modules[gp.DNS_ID] == gp.DNS_LATEST
    log = requests.get(f"{kiln.url}/api/builds/{key}/log", timeout=30).text
    assert "go build" in log
    assert containers_of(client, WORKER_ID) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_compile_timeout_fails_the_build_and_the_worker_builds_the_next(
        kiln: KilnProcesses, client: Any, tmp_path: Path) -> None:
    # the first worker warmed the caches; this one gives each compile step little time
    kiln.stop("worker")
    tight = kiln.start_worker("tight", env={
        "KILN_WORKER__ID": TIGHT_WORKER_ID,
        "KILN_BUILD__COMPILE_TIMEOUT": str(TIGHT_COMPILE_TIMEOUT),
    })
    kiln.wait_for_worker("tight", timeout=120)

    slow = submit(kiln, [SLOW])
    final = kiln.wait_build(slow, timeout=300)
    assert final["state"] == "failed", final
    assert final["attempts"] == MAX_ATTEMPTS
    assert final["error"] == f"compile step timed out after {TIGHT_COMPILE_TIMEOUT}s"
    assert final["retryable"] is True
    history = requests.get(f"{kiln.url}/api/builds/{slow}", timeout=30).json()["attempt_history"]
    assert [a["error"] for a in history] == [final["error"]] * MAX_ATTEMPTS
    # the killed steps' containers are gone, and the worker carries on
    assert containers_of(client, TIGHT_WORKER_ID) == []
    assert tight.poll() is None, kiln.log("tight")[-3000:]

    after = submit(kiln, [f"{gp.HELLO}@v0.2.0"])
    done = kiln.wait_build(after)
    assert done["state"] == "succeeded", (done, kiln.log("tight")[-3000:])
    assert [a["worker_id"] for a in done["attempt_history"]] == [TIGHT_WORKER_ID]
    assert modules_of(kiln.download(done, tmp_path / "caddy"))[gp.HELLO_ID] == "v0.2.0"
    assert containers_of(client, TIGHT_WORKER_ID) == []


# -- which sandbox build.sandbox picks -----------------------------------------------------


def build_config(tmp_path: Path, sandbox: str, image: str) -> BuildConfig:
    return BuildConfig(sandbox=sandbox, cache_dir=tmp_path / "cache",  # type: ignore[arg-type]
                       docker=DockerSandboxConfig(image=image))


@pytest.mark.docker
def test_auto_picks_docker_when_the_engine_answers_and_the_image_is_there(
        image: str, client: Any, tmp_path: Path) -> None:
    sandbox: Any = make_sandbox(build_config(tmp_path, "auto", image))
    assert sandbox.identity == f"docker:{client.images.get(image).id}"
    sandbox.client.close()


@pytest.mark.docker
def test_auto_falls_back_to_process_without_the_image(
        image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = f"kiln-sandbox:missing-{RUN}"
    with caplog.at_level(logging.WARNING, logger="kiln.sandbox"):
        sandbox = make_sandbox(build_config(tmp_path, "auto", missing))
    assert isinstance(sandbox, ProcessSandbox)
    assert f"no {missing} image: run `make images`" in caplog.text


@pytest.mark.docker
def test_docker_mode_without_the_image_fails_at_start(image: str, tmp_path: Path) -> None:
    missing = f"kiln-sandbox:missing-{RUN}"
    with pytest.raises(SandboxError, match=f"sandbox image {missing} not found.*make images"):
        make_sandbox(build_config(tmp_path, "docker", missing))


def test_auto_falls_back_to_process_without_an_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with caplog.at_level(logging.WARNING, logger="kiln.sandbox"):
        sandbox = make_sandbox(build_config(tmp_path, "auto", "kiln-sandbox:latest"))
    assert isinstance(sandbox, ProcessSandbox)
    assert "no Docker Engine answers" in caplog.text
    with pytest.raises(SandboxError, match="no Docker Engine answers"):
        make_sandbox(build_config(tmp_path, "docker", "kiln-sandbox:latest"))


def test_a_worker_that_cannot_hand_its_directories_to_the_step_user_is_refused(
        tmp_path: Path) -> None:
    if os.geteuid() == 1000:
        pytest.skip("this worker runs as the step user: nothing to hand over")
    from kiln.worker.sandbox.docker import DockerSandbox

    root = os.geteuid() == 0
    if root:  # a root test runner plays a worker running as nobody, for a moment
        os.seteuid(NOBODY)
    try:
        with pytest.raises(SandboxError, match="run the worker as root, or set build.docker.user"):
            DockerSandbox(client=None, image="kiln-sandbox:latest",  # type: ignore[arg-type]
                          cache_dir=tmp_path, network="none", memory="1g", pids_limit=64,
                          cpus=1.0, cache_mode="shared", user="1000:1000", goproxy="off")
    finally:
        if root:
            os.seteuid(0)
