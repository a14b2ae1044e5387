"""Sandbox overhead and warm rebuilds: real Go builds of the synthetic Caddy.

Two workloads: ``tiny`` (Caddy + hello: a 2 MB binary that builds in a third of a
second, which shows the fixed cost of a sandbox step) and ``large`` (the same plus the
generated bulk plugin of bench/bulk_plugin.py: a ~38 MB binary, the size of a real
Caddy with a few plugins, whose warm build relinks it).

Kiln's Builder (the xcaddy procedure: go get core, each plugin, a combined re-pin, tidy,
go build) runs the same build with three sandboxes:

- ``bare``: each step as a plain ``subprocess.run`` of go, nothing else (the reference);
- ``process``: Kiln's ProcessSandbox (clean environment, scratch HOME, a watchdog thread);
- ``docker``: Kiln's DockerSandbox (one container for the fetch steps and a hardened one for the compile step, the sandbox image).

Per run, workload and sandbox: empty Go caches, a cold build with hello v0.1.0
(``cold``), then hello v0.2.0 (``rebuild``: one plugin's version changed), then the first
build again (``warm``: the same build with warm caches). ``bare`` shares the process
sandbox's caches and runs only the warm build.

These rows are reported, not judged: the targets are judged on real Caddy beside xcaddy
(bench/real_bench.py). They stay to show a sandbox's fixed cost per step, which the
synthetic proxy (a local directory, no checksum database) leaves nearly alone in the
figures.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bulk_plugin import BULK, BULK_VERSIONS
from bench.infra import remove_tree
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.wiring import make_docker_sandbox
from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import EachStep, Sandbox, Step, StepResult
from kiln.worker.sandbox.process import ProcessSandbox, find_go
from tests.fixtures import goproxy as gp

CADDY_VERSION = "v2.8.4"
FIRST, SECOND = gp.HELLO_VERSIONS[0], gp.HELLO_VERSIONS[1]


class BareSandbox:
    """Run each step as a plain go process: the reference the sandboxes are compared with."""

    def __init__(self, *, cache_dir: Path) -> None:
        self.go = find_go().resolve()
        self.goroot = self.go.parent.parent
        self.cache_dir = cache_dir.resolve()
        self.scratch = self.cache_dir / "bare-scratch"
        for sub in ("home", "tmp", "gopath"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        self.identity = "bare"

    def go_version(self) -> str:
        out = subprocess.run([str(self.go), "env", "GOVERSION"], capture_output=True,
                             text=True, check=True, env=self._env({}))
        return out.stdout.strip()

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {
            "PATH": f"{self.goroot / 'bin'}:/usr/bin:/bin",
            "HOME": str(self.scratch / "home"),
            "TMPDIR": str(self.scratch / "tmp"),
            "GOROOT": str(self.goroot),
            "GOPATH": str(self.scratch / "gopath"),
            # the same caches as ProcessSandbox(cache_dir=...)
            "GOMODCACHE": str(self.cache_dir / "mod"),
            "GOCACHE": str(self.cache_dir / "build"),
            "GOENV": "off", "GOTOOLCHAIN": "local", "GOTELEMETRY": "off",
            "CGO_ENABLED": "0", **extra,
        }

    def run(self, step: Step, *, workdir: Path, on_output: Any = None,
            cancel: threading.Event | None = None) -> StepResult:
        argv = [str(self.go), *step.argv[1:]] if step.argv[0] == "go" else list(step.argv)
        started = time.monotonic()
        out = subprocess.run(argv, cwd=workdir, env=self._env(dict(step.env)),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, check=False)
        return StepResult(exit_code=out.returncode, output=out.stdout,
                          duration=time.monotonic() - started)

    @contextlib.contextmanager
    def session(self, name: str, *, workdir: Path, network: bool, build_key: str,
                timeout: float) -> Iterator[EachStep]:
        yield EachStep(self, workdir)

    def cleanup_orphans(self) -> int:
        return 0


WORKLOADS = ("tiny", "large")


def spec_for(sandbox: Sandbox, hello: str, workload: str = "tiny") -> BuildSpec:
    """Return the spec of Caddy + hello at ``hello`` (+ the bulk plugin for ``large``)."""
    plugins = [ResolvedPlugin(package=gp.HELLO, module=gp.HELLO, version=hello)]
    if workload == "large":
        plugins.append(ResolvedPlugin(package=BULK, module=BULK,
                                      version=BULK_VERSIONS[0]))
    return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=CADDY_VERSION,
                     plugins=tuple(plugins), replacements=(),
                     go_version=sandbox.go_version(), sandbox=sandbox.identity)


@dataclass
class BuildRun:
    """Seconds per build (total and per step) of one sandbox in one run."""

    sandbox: str
    workload: str = "tiny"
    seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)


def _build(builder: Builder, spec: BuildSpec, work: Path, label: str, run: BuildRun) -> None:
    from kiln.artifacts.store import file_sha256

    workdir = work / f"{run.sandbox}-{label}-{time.monotonic_ns()}"
    started = time.monotonic()
    output = builder.build(spec, key=spec.key(), workdir=workdir, log=lambda step, line: None)
    run.seconds[label] = time.monotonic() - started
    run.steps[label] = dict(output.timings)
    run.sha256[label] = file_sha256(output.binary)
    run.size[label] = output.binary.stat().st_size
    remove_tree(workdir)



def docker_sandbox(cache_dir: Path, proxy: str, *, gosumdb: str = "sum.golang.org",
                   worker_id: str = "kiln-bench",
                   wrap: Callable[[Any], Any] = lambda client: client) -> Sandbox | str:
    """Return Kiln's DockerSandbox with the default settings, or why there is none.

    ``wrap`` may stand in front of the engine client (to record what the sandbox starts).
    """
    try:
        from kiln.config import BuildConfig
        from kiln.worker.sandbox.docker_engine import docker_client
    except ImportError as exc:
        return f"docker SDK missing: {exc}"
    client = docker_client(required=False)
    if client is None:
        return "no Docker Engine answers"
    from kiln.worker.sandbox.base import SandboxError

    try:
        config = BuildConfig(goproxy=proxy, gosumdb=gosumdb, cache_dir=cache_dir)
        return make_docker_sandbox(config, client=wrap(client), worker_id=worker_id)
    except SandboxError as exc:
        return str(exc)


def run(*, root: Path, proxy_dir: Path, repeats: int, progress: Callable[[str], None],
        keep: Path | None = None,
        workloads: tuple[str, ...] = WORKLOADS) -> dict[str, Any]:
    """Run the builds; return {"runs": [[BuildRun, ...], ...], "docker_missing": reason}.

    ``keep``: where the last run's warm tiny-workload process-sandbox caches are moved for
    later use. ``proxy_dir`` must hold the bulk plugin (bulk_plugin.add_bulk) for ``large``.
    """
    proxy = f"file://{proxy_dir}"
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[list[BuildRun]] = []
    missing = ""
    for r in range(repeats):
        this: list[BuildRun] = []
        for workload in workloads:
            for kind in ("docker", "process"):
                # each workload starts from empty caches: its cold build is really cold
                cache = root / f"cache-{kind}-{workload}-{r}"
                remove_tree(cache)
                cache.mkdir(parents=True)
                sandbox: Sandbox | str
                if kind == "docker":
                    sandbox = docker_sandbox(cache, proxy)
                    if isinstance(sandbox, str):
                        missing = sandbox
                        progress(f"docker sandbox skipped: {sandbox}")
                        continue
                else:
                    sandbox = ProcessSandbox(go=find_go(), cache_dir=cache)
                builder = Builder(sandbox=sandbox, goproxy=proxy, gosumdb="off",
                                  fetch_timeout=600, compile_timeout=900)
                result = BuildRun(kind, workload)
                _build(builder, spec_for(sandbox, FIRST, workload), work, "cold", result)
                _build(builder, spec_for(sandbox, SECOND, workload), work, "rebuild", result)
                _build(builder, spec_for(sandbox, FIRST, workload), work, "warm", result)
                this.append(result)
                progress(f"{kind} {workload} run {r + 1}: cold {result.seconds['cold']:.1f}s, "
                         f"rebuild {result.seconds['rebuild']:.2f}s, "
                         f"warm {result.seconds['warm']:.2f}s "
                         f"({result.size['warm'] / 1e6:.1f} MB)")
                if kind == "process":
                    bare = BareSandbox(cache_dir=cache)
                    bare_result = BuildRun("bare", workload)
                    _build(Builder(sandbox=bare, goproxy=proxy, gosumdb="off",
                                   fetch_timeout=600, compile_timeout=900),
                           spec_for(bare, FIRST, workload), work, "warm", bare_result)
                    this.append(bare_result)
                    progress(f"bare {workload} run {r + 1}: warm "
                             f"{bare_result.seconds['warm']:.2f}s")
                if kind == "docker" or workload != "tiny":
                    remove_tree(cache)  # docker's is owned by the sandbox user
        runs.append(this)
        kept = root / f"cache-process-tiny-{r}"
        if keep is not None and r == repeats - 1 and not keep.exists() and kept.exists():
            os.replace(kept, keep)
        remove_tree(kept)
    return {"runs": runs, "docker_missing": missing}
