"""Real Caddy from the real Go module proxy: Kiln's Builder beside xcaddy, same run, same Go.

The workload is the newest Caddy v2.11.x the proxy lists (``tests.realcaddy.newest_caddy``)
with three real plugins pinned: github.com/caddy-dns/cloudflare v0.2.1,
github.com/mholt/caddy-ratelimit v0.1.0 and github.com/mholt/caddy-l4/modules/l4tls v0.1.2
(a package inside its module). Modules come from the public Go module proxy and are
checked against the public checksum database, Kiln's production defaults
(``tests.realcaddy.GOPROXY``, ``GOSUMDB``). Three tools build it:

- ``xcaddy``: xcaddy v0.4.5 (``go install``-ed into the shared test cache, never vendored),
  run as a user runs it, ``xcaddy build VERSION --with PKG@VER...``, with Kiln's pinned Go
  (``XCADDY_WHICH_GO``) and the plugins in package order; the reference.
- ``process``: Kiln's Builder with the process sandbox.
- ``docker``: Kiln's Builder with the docker sandbox as a worker configures it by default
  (``build.docker``: the fetch steps in one container on the ``bridge`` network, the
  compile step in its own container with no network; 2 GB, 2 CPUs, uid 1000).

Each tool has its own Go module and build caches, emptied at the start of every run, and
the three take turns (the order rotates from run to run). The rows:

- **cold**: the build with empty module and build caches: every module is downloaded and
  checked against the checksum database, every package compiled, the binary linked.
- **warm**: the same build again with the caches the cold build left.
- **rebuild**: one plugin's version changed (cloudflare v0.2.1 → v0.2.2), warm caches: one
  module downloaded, its packages and Caddy's main package compiled, the binary relinked.

Each row gives Kiln's seconds beside xcaddy's; the ratio (Kiln / xcaddy, per run, then the
median) is judged: the process sandbox ≤ 1.05× in every row, the docker sandbox ≤ 1.15× cold
and ≤ 1.25× warm and rebuild. The notes split each build into everything before
``go build`` (xcaddy: until it runs ``go build``; Kiln: the Builder's fetch phase) and the
``go build`` itself, give the CPU time (user + system) of the build's processes (go, the
compilers, the linker: this process's children, or the containers' CPU cgroups), which
tells a busy machine's wait from work done, and say whether the binary is xcaddy's, byte
for byte.

- **memory**: the peak of a build's memory, sampled every 0.1 s: for xcaddy and the process
  sandbox the sum of VmRSS over the build's process tree (go and the compilers and linker
  it starts; xcaddy itself), for docker over the containers' processes (their memory
  cgroups list them), with the largest single process (VmHWM), and for docker the largest
  peak of a container's memory cgroup, which counts the page cache it was charged too.
- **disk**: what each tool's module and build caches hold after the cold, warm and rebuild
  builds of the last run (``du``).
- **end to end**: a real Kiln (gunicorn, a worker with the process sandbox, PostgreSQL,
  the local store, the real proxy; ``tests.service.KilnProcesses``) with the process
  sandbox's caches, warm from the rows above, and an empty database: the time from
  POST /api/builds of the three-plugin spec (new to this Kiln, so it is built, not served
  from the store) to the binary downloaded, beside the build's own time from the worker's
  build log (first line to result line; per step: fetch, compile, upload), how long the
  POST took to answer and the build waited for a claim, and the worker's peak memory (its
  process tree, sampled, and its own VmHWM).

``smoke``: one build per tool of Caddy with a single plugin (cloudflare) in the shared test
caches (``KILN_TEST_CACHE``, as ``tests/conftest.py`` ``go_cache_dir``), warm once the real
Caddy tests have run; xcaddy and the process sandbox, and docker when an engine answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench import build_bench
from bench.infra import descendants, remove_tree
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import Sandbox
from kiln.worker.sandbox.process import ProcessSandbox, find_go
from tests import realcaddy as rc

Plugin = tuple[str, str, str, str]

#: the judged workload: (package, module, version, a Caddy module id), as tests/realcaddy.py
PLUGINS: tuple[Plugin, ...] = (rc.CLOUDFLARE, rc.RATELIMIT, rc.L4TLS)
#: the rebuild: cloudflare's next version, which the proxy serves too
CLOUDFLARE_NEXT = "v0.2.2"
REBUILD_PLUGINS: tuple[Plugin, ...] = (
    (rc.CLOUDFLARE[0], rc.CLOUDFLARE[1], CLOUDFLARE_NEXT, rc.CLOUDFLARE[3]),
    rc.RATELIMIT, rc.L4TLS)
#: the smoke workload: one small plugin
SMOKE_PLUGINS: tuple[Plugin, ...] = (rc.CLOUDFLARE,)
TOOLS = ("xcaddy", "process", "docker")
MODES = ("cold", "warm", "rebuild")
#: the most Kiln / xcaddy may take, by sandbox and mode
LIMITS: dict[str, dict[str, float]] = {
    "process": {"cold": 1.05, "warm": 1.05, "rebuild": 1.05},
    "docker": {"cold": 1.15, "warm": 1.25, "rebuild": 1.25},
}
#: seconds one build may take: a cold one downloads ~150 modules and compiles ~1,000
#: packages on a shared 2-core machine
BUILD_TIMEOUT_SECONDS = 2400.0
#: seconds between two memory samples
SAMPLE_SECONDS = 0.1
#: seconds between two looks at an end-to-end build's state
POLL_SECONDS = 0.05
MIB = 2**20


def shared_test_cache() -> Path:
    """Return the Go caches the tests share (tests/conftest.py ``go_cache_dir``)."""
    base = Path(os.environ.get("KILN_TEST_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln-tests")
    base.mkdir(parents=True, exist_ok=True)
    return base


# -- memory and CPU ------------------------------------------------------------------------------

def _status_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of a live process in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    rss = hwm = 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def _processes(pids: list[int]) -> tuple[int, int]:
    """Return (sum of VmRSS, largest VmHWM) of ``pids`` in bytes."""
    total = largest = 0
    for pid in pids:
        rss, hwm = _status_kib(pid)
        total += rss
        largest = max(largest, hwm)
    return total * 1024, largest * 1024


def children_cpu_seconds() -> float:
    """Return the CPU time (user + system) of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Probe:
    """What a build's processes use, read in a sampling thread."""

    def __call__(self) -> tuple[int, int, int]:
        """Return (VmRSS summed, largest VmHWM, largest memory cgroup peak) in bytes."""
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """Return the CPU time seen that ``children_cpu_seconds`` does not count."""
        return 0.0


class TreeProbe(Probe):
    """The processes ``pids()`` names (a process tree); their CPU is this process's
    children's, once they have ended."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids

    def __call__(self) -> tuple[int, int, int]:
        return (*_processes(self.pids()), 0)


def _cgroup_dirs(controller: str, container_id: str) -> list[Path]:
    """Return where a container's cgroup may be (v1 or v2, cgroupfs or systemd driver)."""
    root = Path("/sys/fs/cgroup")
    return [root / controller / "docker" / container_id,
            root / controller / "system.slice" / f"docker-{container_id}.scope",
            root / "system.slice" / f"docker-{container_id}.scope",
            root / "docker" / container_id]


def _cgroup_cpu_ns(container_id: str) -> int | None:
    """Return the CPU time a live container used so far (ns), or None."""
    for directory in _cgroup_dirs("cpuacct", container_id):
        with contextlib.suppress(OSError, ValueError):
            return int((directory / "cpuacct.usage").read_text())
        with contextlib.suppress(OSError, ValueError, StopIteration):
            text = (directory / "cpu.stat").read_text()
            return 1000 * int(next(line.split()[1] for line in text.splitlines()
                                   if line.startswith("usage_usec ")))
    return None


class ContainerProbe(Probe):
    """The live containers among ``ids``: their processes, memory cgroups and CPU time.

    The containers' processes are the engine host's (their memory cgroup lists them), read
    as a process tree is: the cgroup's own figures charge a shared page (a build cache file
    another container wrote) to that container, not to the one that maps it. CPU time is
    the last reading of each container's cgroup (up to SAMPLE_SECONDS short of its end).
    """

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self.cpu_ns: dict[str, int] = {}

    def __call__(self) -> tuple[int, int, int]:
        pids: list[int] = []
        charged = 0
        for cid in list(self.ids):
            for directory in _cgroup_dirs("memory", cid):
                try:
                    pids += [int(p) for p in (directory / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    continue
                for name in ("memory.max_usage_in_bytes", "memory.peak"):
                    with contextlib.suppress(OSError, ValueError):
                        charged = max(charged, int((directory / name).read_text()))
                used = _cgroup_cpu_ns(cid)
                if used is not None:
                    self.cpu_ns[cid] = max(self.cpu_ns.get(cid, 0), used)
                break
        return (*_processes(pids), charged)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_ns.values()) / 1e9


class PeakMemory:
    """Sample a probe in a thread until stopped; keep the peaks (bytes)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.total = 0
        self.single = 0
        self.cgroup = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def _sample(self) -> None:
        total, single, cgroup = self.probe()
        self.total = max(self.total, total)
        self.single = max(self.single, single)
        self.cgroup = max(self.cgroup, cgroup)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _RecordingContainers:
    """The engine's containers collection, noting the id of each container created."""

    def __init__(self, inner: Any, ids: set[str]) -> None:
        self._inner = inner
        self._ids = ids

    def create(self, *args: Any, **kwargs: Any) -> Any:
        container = self._inner.create(*args, **kwargs)
        self._ids.add(container.id)
        return container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RecordingClient:
    """A Docker client whose created containers' ids are kept (to read their cgroups)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.ids: set[str] = set()
        self.containers = _RecordingContainers(inner.containers, self.ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def disk_bytes(path: Path) -> int:
    """Return the disk a tree takes (``du``: allocated blocks), without following links."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# -- builds ------------------------------------------------------------------------------

@dataclass
class Build:
    """One build by one tool: seconds, where they went, the binary, the memory peak."""

    tool: str
    mode: str
    seconds: float
    #: seconds until ``go build`` started (xcaddy) / outside the compile step (Kiln)
    before_compile: float
    #: seconds of ``go build``
    compile: float
    sha256: str
    size: int
    #: peak of the build's memory (MiB): its processes' VmRSS summed, sampled
    peak_mib: float
    #: the largest single process's VmHWM (MiB)
    single_mib: float
    #: docker: the largest peak of a container's memory cgroup, page cache included (MiB)
    cgroup_mib: float = 0.0
    #: CPU time (user + system) of the build's processes: go, compilers, linker
    cpu_seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Xcaddy:
    """xcaddy v0.4.5 with its own Go caches, timed line by line."""

    name = "xcaddy"

    def __init__(self, *, binary: Path, cache_dir: Path, work: Path) -> None:
        self.binary = binary
        self.cache_dir = cache_dir
        self.work = work

    def build(self, caddy_version: str, plugins: tuple[Plugin, ...], mode: str) -> Build:
        """Run ``xcaddy build`` as a user would (plugins in package order); time it."""
        workdir = self.work / f"xcaddy-{mode}-{time.monotonic_ns()}"
        workdir.mkdir(parents=True)
        output = workdir / "caddy"
        argv = [str(self.binary), "build", caddy_version, "--output", str(output)]
        for package in sorted(rc.pin(p) for p in plugins):
            argv += ["--with", package]
        # HOME lasts from build to build, as a user's does (go keeps the checksum
        # database's latest signed tree head in $HOME/go), and is emptied with the caches
        env = {**rc.go_env(self.cache_dir, self.cache_dir / "home"),
               "XCADDY_WHICH_GO": str(find_go().resolve()), "GOOS": "linux", "GOARCH": "amd64"}
        lines: list[tuple[float, str]] = []
        cpu = children_cpu_seconds()
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        with PeakMemory(TreeProbe(lambda: [proc.pid, *descendants(proc.pid)])) as memory:
            assert proc.stdout is not None
            deadline = threading.Timer(BUILD_TIMEOUT_SECONDS, proc.kill)
            deadline.start()
            try:
                for line in proc.stdout:
                    lines.append((time.monotonic(), line.rstrip("\n")))
                code = proc.wait()
            finally:
                deadline.cancel()
        ended = time.monotonic()
        cpu = children_cpu_seconds() - cpu
        if code != 0:
            raise RuntimeError("xcaddy failed:\n" + "\n".join(t for _, t in lines[-40:]))
        # xcaddy logs "[INFO] exec (timeout=...): ... go build -o ..." as it starts go build
        compile_at = next((at for at, text in lines
                           if "[INFO] exec" in text and " build -o " in text), ended)
        result = Build(self.name, mode, ended - started, compile_at - started, ended - compile_at,
                       _sha256(output), output.stat().st_size, memory.total / MIB,
                       memory.single / MIB, cpu_seconds=cpu)
        remove_tree(workdir)
        return result


class Kiln:
    """Kiln's Builder with one sandbox, as a worker runs it."""

    def __init__(self, name: str, sandbox: Sandbox, *, work: Path,
                 memory: Callable[[], Probe]) -> None:
        self.name = name
        self.sandbox = sandbox
        self.work = work
        self.memory = memory
        self.builder = Builder(sandbox=sandbox, goproxy=rc.GOPROXY, gosumdb=rc.GOSUMDB,
                               fetch_timeout=BUILD_TIMEOUT_SECONDS,
                               compile_timeout=BUILD_TIMEOUT_SECONDS)

    def spec(self, caddy_version: str, plugins: tuple[Plugin, ...]) -> BuildSpec:
        """Return the build spec a worker would get for Caddy with ``plugins``."""
        return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=caddy_version,
                         plugins=tuple(ResolvedPlugin(package=p[0], module=p[1], version=p[2])
                                       for p in plugins),
                         replacements=(), go_version=self.sandbox.go_version(),
                         sandbox=self.sandbox.identity)

    def build(self, caddy_version: str, plugins: tuple[Plugin, ...], mode: str) -> Build:
        """Build with the Builder; time it."""
        spec = self.spec(caddy_version, plugins)
        workdir = self.work / f"{self.name}-{mode}-{time.monotonic_ns()}"
        probe = self.memory()
        cpu = children_cpu_seconds()
        started = time.monotonic()
        with PeakMemory(probe) as memory:
            output = self.builder.build(spec, key=spec.key(), workdir=workdir,
                                        log=lambda step, line: None)
        seconds = time.monotonic() - started
        cpu = children_cpu_seconds() - cpu + probe.cpu_seconds()
        compile_seconds = output.timings.get("compile", 0.0)
        result = Build(self.name, mode, seconds, seconds - compile_seconds, compile_seconds,
                       _sha256(output.binary), output.binary.stat().st_size,
                       memory.total / MIB, memory.single / MIB, memory.cgroup / MIB,
                       cpu, dict(output.timings))
        remove_tree(workdir)
        return result


def new_children() -> Callable[[], Probe]:
    """Return a factory of probes of this process's children started after the probe."""
    def factory() -> Probe:
        before = set(descendants(os.getpid()))
        return TreeProbe(lambda: [p for p in descendants(os.getpid()) if p not in before])
    return factory


def docker_kiln(cache_dir: Path, work: Path) -> Kiln | str:
    """Return Kiln with the docker sandbox a worker configures by default, or why not."""
    recordings: list[RecordingClient] = []

    def recording(client: Any) -> RecordingClient:
        recordings.append(RecordingClient(client))
        return recordings[0]

    sandbox = build_bench.docker_sandbox(cache_dir, rc.GOPROXY, gosumdb=rc.GOSUMDB,
                                         worker_id="kiln-bench-real", wrap=recording)
    if isinstance(sandbox, str):
        return sandbox
    return Kiln("docker", sandbox, work=work, memory=lambda: ContainerProbe(recordings[0].ids))


def cache_dirs(tool: str, cache_dir: Path) -> dict[str, Path]:
    """Return the module and build cache directories a tool uses under ``cache_dir``."""
    base = cache_dir / "docker" if tool == "docker" else cache_dir
    return {"mod": base / "mod", "build": base / "build"}


def make_tool(tool: str, cache_dir: Path, work: Path, xcaddy: Path) -> Xcaddy | Kiln | str:
    """Return one of TOOLS with its caches under ``cache_dir``, or why it is missing."""
    if tool == "xcaddy":
        return Xcaddy(binary=xcaddy, cache_dir=cache_dir, work=work)
    if tool == "process":
        return Kiln("process", ProcessSandbox(go=find_go(), cache_dir=cache_dir), work=work,
                    memory=new_children())
    return docker_kiln(cache_dir, work)


# -- end to end --------------------------------------------------------------------------

def end_to_end(*, db_url: str, root: Path, cache_dir: Path, caddy_version: str,
               plugins: tuple[Plugin, ...]) -> dict[str, Any]:
    """Build through a real Kiln: POST /api/builds until the binary is downloaded."""
    import psycopg

    from kiln.config import DatabaseConfig
    from kiln.db.build_logs import BuildLogs
    from kiln.db.migrate import Migrator
    from kiln.db.pool import make_pool
    from tests.service import KilnProcesses

    with psycopg.connect(db_url, autocommit=True) as conn:
        Migrator(conn).migrate()
    service = KilnProcesses(db_url=db_url, root=root, goproxy=rc.GOPROXY, cache_dir=cache_dir,
                            env={"KILN_BUILD__GOSUMDB": rc.GOSUMDB,
                                 "KILN_BUILD__FETCH_TIMEOUT": str(BUILD_TIMEOUT_SECONDS),
                                 "KILN_BUILD__COMPILE_TIMEOUT": str(BUILD_TIMEOUT_SECONDS),
                                 "KILN_WORKER__LEASE_SECONDS": "30",
                                 "KILN_LOGGING__LEVEL": "INFO"})
    body = {"os": "linux", "arch": "amd64", "caddy_version": caddy_version,
            "plugins": [rc.pin(p) for p in plugins]}
    with service.running():
        worker = service.procs["worker"].pid
        session = requests.Session()
        with PeakMemory(TreeProbe(lambda: [worker, *descendants(worker)])) as memory:
            posted_wall = time.time()
            started = time.monotonic()
            resp = session.post(f"{service.url}/api/builds", json=body, timeout=60)
            answered = time.monotonic()
            if resp.status_code not in (200, 202):
                raise RuntimeError(f"POST /api/builds: {resp.status_code} {resp.text}")
            key = resp.json()["key"]
            deadline = started + BUILD_TIMEOUT_SECONDS
            while True:
                doc = session.get(f"{service.url}/api/builds/{key}", timeout=30).json()
                if doc["state"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"build {key} still {doc['state']}")
                time.sleep(POLL_SECONDS)
            seen = time.monotonic()
            if doc["state"] != "succeeded":
                raise RuntimeError(f"build {key} {doc['state']}: {doc.get('error')}\n"
                                   + service.log("worker")[-3000:])
            artifact = session.get(f"{service.url}/api/builds/{key}/artifact", timeout=300)
            artifact.raise_for_status()
            downloaded = time.monotonic()
        worker_hwm = _status_kib(worker)[1] / 1024
    if hashlib.sha256(artifact.content).hexdigest() != doc["artifact"]["sha256"]:
        raise RuntimeError("the downloaded binary is not the build's artifact")
    pool = make_pool(db_url, DatabaseConfig(), application="kiln-bench", min_size=1,
                     max_size=1)
    try:
        pool.wait()
        lines = list(BuildLogs(pool).iter_lines(key))
    finally:
        pool.close()
    first: dict[str, float] = {}
    for line in lines:
        first.setdefault(line.step, line.at.timestamp())
    order = [s for s in ("resolve", "fetch", "compile", "upload", "result") if s in first]
    steps = {a: first[b] - first[a] for a, b in zip(order, order[1:], strict=False)}
    # the database's times, and the worker's log, against the wall clock at the POST
    created = dt.datetime.fromisoformat(doc["created_at"]).timestamp() - posted_wall
    claimed = dt.datetime.fromisoformat(doc["started_at"]).timestamp() - posted_wall
    finished = dt.datetime.fromisoformat(doc["finished_at"]).timestamp() - posted_wall
    return {
        "key": key,
        "seconds": downloaded - started,
        "build_seconds": lines[-1].at.timestamp() - lines[0].at.timestamp(),
        "steps": steps,
        "post_seconds": answered - started,
        "queued_seconds": claimed - created,
        "claimed_seconds": claimed,
        "finished_seconds": finished,
        "seen_after_finish_seconds": (seen - started) - finished,
        "download_seconds": downloaded - seen,
        "size": len(artifact.content),
        "sha256": doc["artifact"]["sha256"],
        "worker_tree_peak_mib": memory.total / MIB,
        "worker_peak_mib": worker_hwm,
    }


# -- the group ---------------------------------------------------------------------------

def failure(exc: BaseException) -> str:
    """Return what a failed build's row shows: its step and the last lines of its message."""
    # go prints "downloading" as it unpacks a module from the cache, too: not the error
    lines = [line for line in str(exc).splitlines()
             if line.strip() and not line.startswith("go: downloading ")]
    step = getattr(exc, "step", "")
    return (f"{type(exc).__name__}{f' ({step} step)' if step else ''}: "
            + " / ".join(lines[-3:])[:600])


def run(*, root: Path, repeats: int, progress: Callable[[str], None], smoke: bool = False,
        db_url: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Run the builds; return raw figures (see the module docstring).

    ``db_url(name)`` returns the URL of a fresh database for an end-to-end run (None: no
    end-to-end rows).
    """
    caddy = rc.newest_caddy()
    shared = shared_test_cache()
    xcaddy = rc.xcaddy(shared)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"caddy_version": caddy, "smoke": smoke, "runs": [], "missing": {},
                           "failed": {}, "disk": {}, "end_to_end": [],
                           "plugins": [rc.pin(p) for p in (SMOKE_PLUGINS if smoke else PLUGINS)],
                           "rebuild_plugins": [] if smoke else [rc.pin(p)
                                                                for p in REBUILD_PLUGINS]}
    progress(f"real Caddy {caddy} from {rc.GOPROXY}; xcaddy {rc.XCADDY_VERSION} at {xcaddy}")
    if smoke:
        this: dict[str, dict[str, Any]] = {}
        for name in TOOLS:
            tool = make_tool(name, shared, work, xcaddy)
            if isinstance(tool, str):
                out["missing"][name] = tool
                progress(f"{name} skipped: {tool}")
                continue
            try:
                result = tool.build(caddy, SMOKE_PLUGINS, "warm")
            except Exception as exc:  # shown in its row, as in a full run
                out["failed"][name] = {"warm": failure(exc)}
                progress(f"{name} smoke build failed: {failure(exc)}")
                continue
            this[name] = {"warm": vars(result)}
            progress(f"{name} smoke build (shared test caches): {result.seconds:.1f}s")
        out["runs"].append(this)
        remove_tree(work)
        return out
    for r in range(repeats):
        this = {}
        tools: dict[str, Xcaddy | Kiln] = {}
        caches: dict[str, Path] = {}
        for name in TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)]:
            cache = root / f"cache-{name}"
            remove_tree(cache)
            cache.mkdir(parents=True)
            tool = make_tool(name, cache, work, xcaddy)
            if isinstance(tool, str):
                out["missing"][name] = tool
                progress(f"{name} skipped: {tool}")
                remove_tree(cache)
                continue
            tools[name], caches[name] = tool, cache
            this[name] = {}
        for mode in MODES:
            plugins = REBUILD_PLUGINS if mode == "rebuild" else PLUGINS
            for name, tool in tools.items():
                if name in out["failed"] and len(this[name]) < MODES.index(mode):
                    continue  # an earlier build of this run failed: its caches are not warm
                try:
                    result = tool.build(caddy, plugins, mode)
                except Exception as exc:  # a failed build is a finding, shown in its row
                    out["failed"].setdefault(name, {})[mode] = failure(exc)
                    progress(f"{name} run {r + 1}, {mode}: failed: {failure(exc)}")
                    continue
                this[name][mode] = vars(result)
                progress(f"{name} run {r + 1}, {mode}: {result.seconds:.1f}s (before go build "
                         f"{result.before_compile:.1f}s, go build {result.compile:.1f}s; "
                         f"{result.size / 1e6:.1f} MB; peak {result.peak_mib:.0f} MiB)")
        out["runs"].append(this)
        for name, cache in caches.items():
            out["disk"][name] = {kind: disk_bytes(path)
                                 for kind, path in cache_dirs(name, cache).items()}
        if (r == repeats - 1 and db_url is not None
                and len(this.get("process", {})) == len(MODES)):
            # the process sandbox's caches are warm: Kiln builds the spec anew
            for e in range(repeats):
                try:
                    result_e2e = end_to_end(
                        db_url=db_url(f"kiln_bench_real_{e}"), root=root / f"kiln-{e}",
                        cache_dir=caches["process"], caddy_version=caddy, plugins=PLUGINS)
                except Exception as exc:  # shown in the row
                    out["failed"].setdefault("end_to_end", {})[str(e)] = failure(exc)
                    progress(f"end to end run {e + 1}: failed: {failure(exc)}")
                    break
                out["end_to_end"].append(result_e2e)
                progress(f"end to end run {e + 1}: {result_e2e['seconds']:.1f}s, the build "
                         f"{result_e2e['build_seconds']:.1f}s")
        for cache in caches.values():
            remove_tree(cache)
    remove_tree(work)
    return out

