"""The docker sandbox against a real engine: what a build step can and cannot do.

Each probe runs through the Sandbox API in the configuration the builder uses (a
``compile`` step has no network; a ``fetch`` step has one), with busybox's sh or small
Go programs built inside the sandbox.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import NotFound

from kiln.worker.sandbox.base import COMPILE, FETCH, SANDBOX_LABEL, SandboxError, Step, StepResult
from kiln.worker.sandbox.docker import DockerSandbox
from kiln.worker.sandbox.docker_engine import (
    DEADLINE_LABEL,
    HOST_LABEL,
    PID_LABEL,
    WORKER_LABEL,
    docker_client,
)
from tests.dockerutil import ensure_sandbox_image, require_docker

pytestmark = pytest.mark.docker

#: every container these tests start carries this worker id, so they can be counted
WORKER = f"kiln-test-{uuid.uuid4().hex[:8]}"
SANDBOX_UID = 1000
GREETING_MODULE = "example.com/greeting"
GREETING_VERSION = "v1.0.0"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    require_docker()
    engine = docker_client(required=True)
    assert engine is not None
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def image(client: Any) -> str:
    return ensure_sandbox_image()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def make(client: Any, image: str, cache_dir: Path) -> Any:
    """Return a factory of sandboxes with small limits, overridable per test."""

    def factory(**overrides: Any) -> DockerSandbox:
        settings: dict[str, Any] = {
            "client": client,
            "image": image,
            "cache_dir": cache_dir,
            "network": "bridge",
            "memory": "256m",
            "pids_limit": 128,
            "cpus": 1.0,
            "cache_mode": "shared",
            "user": f"{SANDBOX_UID}:{SANDBOX_UID}",
            "worker_id": WORKER,
            "goproxy": "https://proxy.golang.org",
        }
        settings.update(overrides)
        return DockerSandbox(**settings)

    return factory


@pytest.fixture(scope="module")
def sandbox(make: Any) -> DockerSandbox:
    return make()


@pytest.fixture(autouse=True)
def no_leftover_containers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a sandbox container of this run behind."""
    yield
    if "client" not in request.fixturenames:
        return
    engine = request.getfixturevalue("client")
    left = engine.containers.list(all=True, ignore_removed=True,
        filters={"label": [SANDBOX_LABEL, f"{WORKER_LABEL}={WORKER}"]}
    )
    for container in left:
        container.remove(force=True)
    assert not left, f"sandbox containers left behind: {[c.name for c in left]}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def compile_sh(script: str, *, timeout: float = 60.0, env: dict[str, str] | None = None) -> Step:
    """Return a compile step (no network) running ``script`` in the image's sh."""
    return Step(COMPILE, ("sh", "-c", script), env=env or {}, network=False, timeout=timeout,
                build_key="test")


def fetch_sh(script: str, *, env: dict[str, str] | None = None) -> Step:
    """Return a fetch step (network as configured) running ``script``."""
    return Step(FETCH, ("sh", "-c", script), env=env or {}, network=True, timeout=60.0,
                build_key="test")


def run(sandbox: DockerSandbox, step: Step, workdir: Path, **kwargs: Any) -> StepResult:
    return sandbox.run(step, workdir=workdir, **kwargs)


# -- identity and the user ---------------------------------------------------------------


def test_identity_is_the_image_id_and_go_comes_from_the_image(
    sandbox: DockerSandbox, client: Any, image: str
) -> None:
    image_id = client.images.get(image).id
    assert sandbox.identity == f"docker:{image_id}"
    assert image_id.startswith("sha256:")
    version = sandbox.go_version()
    assert version.startswith("go1.")
    assert client.images.get(image).labels["dev.kiln.go.version"] == version.removeprefix("go")


def test_steps_run_as_uid_1000(sandbox: DockerSandbox, client: Any, image: str,
                               workdir: Path) -> None:
    assert client.images.get(image).attrs["Config"]["User"] == "1000:1000"
    result = run(sandbox, compile_sh("id -u; id -g; touch /work/made-by-step"), workdir)
    assert result.ok, result.output
    assert result.output.split() == ["1000", "1000"]
    made = (workdir / "made-by-step").stat()
    assert (made.st_uid, made.st_gid) == (SANDBOX_UID, SANDBOX_UID)


def test_root_is_refused_as_the_step_user(make: Any) -> None:
    for user in ("0", "0:0", "root", "root:root"):
        with pytest.raises(SandboxError, match="root"):
            make(user=user)


# -- isolation ---------------------------------------------------------------------------


class _Listener:
    """A TCP server on all host addresses that records who connected."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    server = _Listener()
    yield server
    server.close()


def _gateway(client: Any) -> str:
    """Return the host's address on the default bridge (the engine's default: subnet .1)."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"]
    for entry in config:
        if entry.get("Gateway"):
            return str(entry["Gateway"])
    return str(ipaddress.ip_network(config[0]["Subnet"])[1])


def _connect_script(hosts: list[str], port: int) -> str:
    return "".join(
        f"if nc -w 3 {h} {port} </dev/null; then echo reached {h}; else echo blocked {h}; fi; "
        for h in hosts
    ) + "echo interfaces: $(ls /sys/class/net)"


def test_compile_step_has_no_network(make: Any, sandbox: DockerSandbox, client: Any,
                                     workdir: Path, listener: _Listener) -> None:
    gateway = _gateway(client)
    # the probe works: a fetch step on the bridge reaches the host through the gateway ...
    reached = run(make(network="bridge"), fetch_sh(_connect_script([gateway], listener.port)),
                  workdir)
    assert f"reached {gateway}" in reached.output, reached.output
    # ... and one on the host network reaches the host's loopback
    reached = run(make(network="host"), fetch_sh(_connect_script(["127.0.0.1"], listener.port)),
                  workdir)
    assert "reached 127.0.0.1" in reached.output, reached.output
    seen = len(listener.peers)
    assert seen == 2

    result = run(sandbox, compile_sh(_connect_script(["127.0.0.1", gateway], listener.port)),
                 workdir)
    assert f"blocked {gateway}" in result.output, result.output
    assert "blocked 127.0.0.1" in result.output, result.output
    assert "interfaces: lo" in result.output
    assert len(listener.peers) == seen


def test_worker_environment_is_not_visible(sandbox: DockerSandbox, workdir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("KILN_TEST_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    result = run(sandbox, compile_sh("env; tr '\\0' '\\n' </proc/1/environ",
                                     env={"GOOS": "linux", "GOARCH": "arm64"}), workdir)
    assert result.ok, result.output
    assert secret not in result.output
    assert "KILN_TEST_SECRET" not in result.output
    # what the step asked for does arrive, on top of the image's own variables
    assert "GOARCH=arm64" in result.output
    assert "GOCACHE=/cache/go-build" in result.output


def test_host_files_outside_the_workdir_are_not_visible(sandbox: DockerSandbox, tmp_path: Path,
                                                        workdir: Path) -> None:
    token = uuid.uuid4().hex
    outside = tmp_path / "outside.txt"
    outside.write_text(token)
    (workdir / "inside.txt").write_text("visible")
    in_root = Path.home() / f".kiln-probe-{token}"
    try:
        in_root.write_text(token)
    except OSError:
        in_root = outside
    script = (
        f"cat /work/inside.txt; echo; "
        f"for f in {outside} {in_root} /var/run/docker.sock /etc/shadow; do "
        f"  if test -e $f; then echo present $f; else echo absent $f; fi; "
        f"done; grep -rl {token} /work /tmp /home /go /cache 2>/dev/null; true"
    )
    try:
        result = run(sandbox, compile_sh(script), workdir)
    finally:
        if in_root != outside:
            in_root.unlink()
    assert result.ok, result.output
    assert result.output.startswith("visible")
    for path in (outside, in_root, "/var/run/docker.sock", "/etc/shadow"):
        assert f"absent {path}" in result.output, result.output
    assert token not in result.output.replace(str(in_root), "").replace(str(outside), "")


def test_root_filesystem_is_read_only(sandbox: DockerSandbox, workdir: Path) -> None:
    script = (
        "for f in /probe /usr/local/go/bin/probe /etc/probe /go/probe; do "
        "  if touch $f 2>/dev/null; then echo wrote $f; else echo refused $f; fi; done; "
        "touch /tmp/ok /home/builder/ok /work/ok && echo scratch-ok"
    )
    result = run(sandbox, compile_sh(script), workdir)
    assert result.ok, result.output
    assert "wrote" not in result.output
    assert result.output.count("refused") == 4
    assert "scratch-ok" in result.output
    assert (workdir / "ok").exists()


def test_module_cache_is_read_only_in_compile_and_writable_in_fetch(
    sandbox: DockerSandbox, workdir: Path
) -> None:
    probe = "if touch /go/pkg/mod/probe 2>/dev/null; then echo wrote; else echo refused; fi"
    fetched = run(sandbox, fetch_sh(probe), workdir)
    assert fetched.output.strip() == "wrote", fetched.output
    compiled = run(sandbox, compile_sh(probe + "; ls /go/pkg/mod"), workdir)
    assert compiled.output.split() == ["refused", "probe"], compiled.output
    (sandbox.modcache / "probe").unlink()


def test_copy_mode_keeps_writes_out_of_the_shared_build_cache(make: Any, workdir: Path) -> None:
    shared = make(cache_mode="shared")
    copying = make(cache_mode="copy")
    marker = f"planted-{uuid.uuid4().hex[:8]}"
    (shared.buildcache / "seed").write_text("from the shared cache")
    script = f"cat /cache/go-build/seed; echo; touch /cache/go-build/{marker}"
    result = run(copying, compile_sh(script), workdir)
    assert result.ok, result.output
    assert "from the shared cache" in result.output
    assert not (shared.buildcache / marker).exists()
    assert list(copying.copies.iterdir()) == []  # the private copy is gone
    result = run(shared, compile_sh(f"touch /cache/go-build/{marker}"), workdir)
    assert result.ok, result.output
    assert (shared.buildcache / marker).exists()
    (shared.buildcache / marker).unlink()
    (shared.buildcache / "seed").unlink()


# -- limits ------------------------------------------------------------------------------


def test_fork_bomb_is_contained(make: Any, workdir: Path) -> None:
    tight = make(pids_limit=64)
    started = time.monotonic()
    # every shell forks again until a fork fails, the first shell included
    result = run(tight, compile_sh("b(){ b & b; }; b", timeout=60), workdir)
    elapsed = time.monotonic() - started
    assert "can't fork" in result.output  # the limit stopped it, not the bomb's end
    assert not result.ok
    assert result.killed != "timeout"
    assert elapsed < 15, f"fork bomb ran {elapsed:.1f}s"


def test_memory_over_the_limit_is_killed_as_oom(make: Any, workdir: Path) -> None:
    small = make(memory="64m")
    script = "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived ${#x}"
    result = run(small, compile_sh(script), workdir)
    assert result.killed == "oom", (result.exit_code, result.output)
    assert "survived" not in result.output
    assert not result.ok


def test_endless_step_is_killed_at_its_timeout(sandbox: DockerSandbox, workdir: Path) -> None:
    result = run(sandbox, compile_sh("echo started; while :; do :; done", timeout=2), workdir)
    assert result.killed == "timeout"
    assert result.timed_out
    assert result.output == "started"
    assert 2 <= result.duration < 6, result.duration


def test_cancel_stops_a_step_at_once(sandbox: DockerSandbox, workdir: Path) -> None:
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def cancel_on_first_line(line: str) -> None:
        cancelled_at.append(time.monotonic())
        cancel.set()

    result = run(sandbox, compile_sh("echo running; sleep 600", timeout=300), workdir,
                 on_output=cancel_on_first_line, cancel=cancel)
    lag = time.monotonic() - cancelled_at[0]
    assert result.killed == "cancelled"
    assert not result.ok
    assert lag < 1.0, f"cancel took {lag:.2f}s"


def test_output_is_streamed_line_by_line(sandbox: DockerSandbox, workdir: Path) -> None:
    seen: list[tuple[float, str]] = []
    script = "echo one; echo to-stderr >&2; sleep 1.5; printf 'two\\nno newline'; exit 3"
    result = run(sandbox, compile_sh(script), workdir,
                 on_output=lambda line: seen.append((time.monotonic(), line)))
    lines = [line for _, line in seen]
    # stdout and stderr both arrive; each keeps its order (not their interleaving)
    assert sorted(lines) == sorted(["one", "to-stderr", "two", "no newline"])
    assert [line for line in lines if line != "to-stderr"] == ["one", "two", "no newline"]
    assert seen[lines.index("two")][0] - seen[0][0] > 1.0  # lines come while the step runs
    assert result.output.splitlines() == lines
    assert result.exit_code == 3
    assert result.killed is None


def test_cancel_before_start_runs_nothing(sandbox: DockerSandbox, workdir: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    result = run(sandbox, compile_sh("touch /work/ran"), workdir, cancel=cancel)
    assert result.killed == "cancelled"
    assert not (workdir / "ran").exists()


def test_a_session_runs_its_steps_in_one_container(sandbox: DockerSandbox, client: Any,
                                                    workdir: Path) -> None:
    def containers() -> set[str]:
        found = client.containers.list(all=True, ignore_removed=True,
            filters={"label": [SANDBOX_LABEL, f"{WORKER_LABEL}={WORKER}"]})
        return {c.id for c in found}

    seen: set[str] = set()
    with sandbox.session(FETCH, workdir=workdir, network=True, build_key="test",
                         timeout=300) as session:
        first = session.run(fetch_sh("echo one > /work/one; hostname"))
        seen |= containers()
        second = session.run(fetch_sh('cat /work/one; echo "[$GREETING]"; hostname',
                                      env={"GREETING": "hi"}))
        seen |= containers()
        failed = session.run(fetch_sh('echo "[$GREETING]"; hostname; exit 3'))
        seen |= containers()
        slow = session.run(Step(FETCH, ("sh", "-c", "echo waiting; sleep 600"), network=True,
                                timeout=1.5, build_key="test"))
    assert first.ok and second.ok, (first, second)
    assert len(seen) == 1
    hosts = {result.output.splitlines()[-1] for result in (first, second, failed)}
    assert len(hosts) == 1 and hosts <= {c[:12] for c in seen}
    assert second.output.splitlines()[:2] == ["one", "[hi]"]
    # each step gets its own variables only, not the previous step's
    assert (failed.exit_code, failed.killed, failed.output.splitlines()[0]) == (3, None, "[]")
    assert (slow.killed, slow.timed_out) == ("timeout", True) and "waiting" in slow.output
    assert not containers()


# -- orphans -----------------------------------------------------------------------------


def _leftover(client: Any, image: str, **labels: str) -> Any:
    """Start a labelled container the way a worker that then crashed would have left it."""
    return client.containers.run(image, ["sleep", "600"], detach=True, network_mode="none",
                                 labels={SANDBOX_LABEL: "some-build", **labels})


def test_cleanup_orphans_removes_leftovers_and_spares_live_workers(
    make: Any, client: Any, image: str
) -> None:
    other = f"{WORKER}-other"
    host = f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    gone = subprocess.Popen(["true"])
    gone.wait()
    future = str(int(time.time()) + 3600)
    predecessor = _leftover(client, image, **{WORKER_LABEL: WORKER, HOST_LABEL: "elsewhere",
                                              PID_LABEL: "1", DEADLINE_LABEL: future})
    dead_process = _leftover(client, image, **{WORKER_LABEL: other, HOST_LABEL: host,
                                               PID_LABEL: str(gone.pid), DEADLINE_LABEL: future})
    expired = _leftover(client, image, **{WORKER_LABEL: other, HOST_LABEL: "elsewhere",
                                          PID_LABEL: "1", DEADLINE_LABEL: "1000"})
    live = _leftover(client, image, **{WORKER_LABEL: other, HOST_LABEL: host,
                                       PID_LABEL: str(os.getpid()), DEADLINE_LABEL: future})
    # a worker in a container on the host network: same host name, pids of its own
    elsewhere = f"{socket.gethostname()}/pid:[1]"
    foreign = _leftover(client, image, **{WORKER_LABEL: other, HOST_LABEL: elsewhere,
                                          PID_LABEL: str(gone.pid), DEADLINE_LABEL: future})
    try:
        # (no exact count: other workers on this engine may remove some of these first)
        make().cleanup_orphans()
        labelled = {c.id for c in client.containers.list(all=True, ignore_removed=True,
            filters={"label": SANDBOX_LABEL})}
        assert predecessor.id not in labelled  # same worker id: a crashed predecessor
        assert dead_process.id not in labelled  # its supervising process is gone
        assert expired.id not in labelled  # long past its step's deadline
        assert live.id in labelled  # another live worker's build is left alone
        assert foreign.id in labelled  # its pid means nothing here
        # a worker that restarts with that id takes its predecessor's containers away
        assert make(worker_id=other).cleanup_orphans() >= 1
        assert live.id not in {c.id for c in client.containers.list(all=True)}
    finally:
        for container in (predecessor, dead_process, expired, live, foreign):
            with contextlib.suppress(NotFound):  # cleanup_orphans removed it
                container.remove(force=True)


def test_cleanup_orphans_spares_the_steps_it_is_running(sandbox: DockerSandbox,
                                                         workdir: Path) -> None:
    results: list[StepResult] = []
    started = threading.Event()
    runner = threading.Thread(target=lambda: results.append(run(
        sandbox, compile_sh("echo up; sleep 2; echo done"), workdir,
        on_output=lambda line: started.set())))
    runner.start()
    assert started.wait(30)
    sandbox.cleanup_orphans()
    runner.join(30)
    assert results and results[0].ok, results
    assert results[0].output == "up\ndone"


# -- Go inside the sandbox ---------------------------------------------------------------


def _write_proxy(root: Path) -> Path:
    """Write a file:// module proxy holding example.com/greeting v1.0.0; return its root."""
    base = root / GREETING_MODULE / "@v"
    base.mkdir(parents=True)
    mod = f"module {GREETING_MODULE}\n\ngo 1.22\n"
    source = 'package greeting\n\nfunc Hello() string { return "hello from a module proxy" }\n'
    (base / "list").write_text(f"{GREETING_VERSION}\n")
    (base / f"{GREETING_VERSION}.info").write_text(
        json.dumps({"Version": GREETING_VERSION, "Time": "2024-01-01T00:00:00Z"}))
    (base / f"{GREETING_VERSION}.mod").write_text(mod)
    buf = io.BytesIO()
    prefix = f"{GREETING_MODULE}@{GREETING_VERSION}/"
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(prefix + "go.mod", mod)
        archive.writestr(prefix + "greeting.go", source)
    (base / f"{GREETING_VERSION}.zip").write_bytes(buf.getvalue())
    # the steps run as uid 1000: the proxy must be world-readable, as in production
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(Path(dirpath, name), 0o644)
    os.chmod(root, 0o755)
    return root


def _write_programs(workdir: Path) -> None:
    (workdir / "go.mod").write_text("module probe\n\ngo 1.22\n")
    hello = workdir / "hello"
    hello.mkdir()
    (hello / "main.go").write_text(
        'package main\n\nimport (\n\t"fmt"\n\n\t"example.com/greeting"\n)\n\n'
        "func main() { fmt.Println(greeting.Hello()) }\n"
    )
    bomb = workdir / "forkbomb"
    bomb.mkdir()
    # a fork bomb that, unlike a shell, survives failing forks and keeps trying
    (bomb / "main.go").write_text(
        'package main\n\nimport "syscall"\n\n'
        "func main() {\n"
        "\tattr := &syscall.ProcAttr{}\n"
        "\tfor {\n"
        '\t\t_, _ = syscall.ForkExec("/bin/sleep", []string{"sleep", "600"}, attr)\n'
        "\t}\n}\n"
    )


@pytest.fixture(scope="module")
def go_build(make: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fetch through a file:// proxy, then compile two programs in the sandbox."""
    root = tmp_path_factory.mktemp("gobuild")
    proxy = _write_proxy(root / "proxy")
    workdir = root / "work"
    workdir.mkdir()
    _write_programs(workdir)
    url = f"file://{proxy}"
    sandbox = make(memory="1g", pids_limit=512, cpus=2.0, goproxy=url)
    env = {"GOPROXY": url, "GOSUMDB": "off", "GOFLAGS": "-mod=mod"}
    fetch = Step(FETCH, ("go", "mod", "tidy"), env=env, network=True, timeout=300)
    fetched = sandbox.run(fetch, workdir=workdir)
    # the same fetch configuration, asked what it can reach and write
    probe = sandbox.run(
        Step(FETCH, ("sh", "-c", f"echo interfaces: $(ls /sys/class/net); "
                                 f"touch {proxy}/x 2>/dev/null && echo wrote-proxy; true"),
             env=env, network=True),
        workdir=workdir,
    )
    started = time.monotonic()
    compile_step = Step(
        COMPILE,
        ("go", "build", "-trimpath", "-ldflags", "-w -s", "-o", "/work/bin/", "./..."),
        env={"GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"},
        network=False, timeout=600,
    )
    compiled = sandbox.run(compile_step, workdir=workdir)
    return {
        "fetched": fetched, "probe": probe, "compiled": compiled, "workdir": workdir,
        "seconds": time.monotonic() - started, "sandbox": sandbox,
    }


@pytest.mark.slow
def test_fetch_reaches_a_file_proxy_without_network(go_build: dict[str, Any]) -> None:
    fetched = go_build["fetched"]
    assert fetched.ok, fetched.output
    assert f"{GREETING_MODULE} {GREETING_VERSION}" in (go_build["workdir"] / "go.mod").read_text()
    probe = go_build["probe"]
    assert "interfaces: lo" in probe.output  # a file:// proxy needs no network at all
    assert "wrote-proxy" not in probe.output  # and is mounted read-only
    assert (go_build["sandbox"].modcache / "cache" / "download" / GREETING_MODULE).is_dir()


@pytest.mark.slow
def test_go_build_makes_a_static_binary_in_the_workdir(go_build: dict[str, Any],
                                                       tmp_path: Path) -> None:
    compiled = go_build["compiled"]
    assert compiled.ok, compiled.output
    binary = go_build["workdir"] / "bin" / "hello"
    assert binary.is_file()
    assert binary.stat().st_mode & stat.S_IXUSR
    assert not _has_interpreter(binary.read_bytes()), "binary is dynamically linked"
    # it runs on the host, with what it compiled in from the module proxy
    copy = tmp_path / "hello"
    shutil.copy(binary, copy)
    out = subprocess.run([str(copy)], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "hello from a module proxy"


@pytest.mark.slow
def test_a_fork_bomb_that_keeps_trying_is_killed(go_build: dict[str, Any], make: Any) -> None:
    assert go_build["compiled"].ok, go_build["compiled"].output
    tight = make(pids_limit=64)
    started = time.monotonic()
    result = tight.run(
        Step(COMPILE, ("/work/bin/forkbomb",), network=False, timeout=60),
        workdir=go_build["workdir"],
    )
    elapsed = time.monotonic() - started
    # it holds nearly every pid it may, so the sandbox stops it instead of waiting it out
    assert result.killed == "pids", (result.exit_code, result.killed, result.output[-2000:])
    assert elapsed < 15, f"fork bomb ran {elapsed:.1f}s"


def _has_interpreter(elf: bytes) -> bool:
    """Tell whether a 64-bit little-endian ELF file asks for a dynamic loader (PT_INTERP)."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    for i in range(phnum):
        entry = phoff + i * phentsize
        if int.from_bytes(elf[entry:entry + 4], "little") == 3:  # PT_INTERP
            return True
    return False
