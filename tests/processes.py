"""Processes the end-to-end tests and the benchmarks drive, beyond Kiln's own.

A build's sandbox steps (the process sandbox marks their environment), a PostgreSQL server
of their own that they can stop and restart, and a Kiln started with no worker running.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.service import KilnProcesses, free_port


def sandbox_processes(key: str) -> list[int]:
    """Return the pids of processes running a build step of ``key``."""
    marker = f"DEV_KILN_SANDBOX={key}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_sandbox_processes(key: str) -> int:
    """Kill the steps a SIGKILLed worker left running (they outlive it); return how many."""
    pids = sandbox_processes(key)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def start_without_a_worker(service: KilnProcesses) -> None:
    """Start the janitor and the API once a worker has registered and left."""
    # the API keys builds with a registered worker's toolchain; this one leaves at once
    service.start_worker("first", args=["--idle-exit", "0.1"])
    service.wait_for_worker("first")
    service.procs["first"].wait(30)
    service.start_janitor()
    service.start_api()


def ensure_worker(kiln: KilnProcesses, name: str = "warm") -> None:
    """Start worker ``name`` unless it runs; wait until it claims."""
    proc = kiln.procs.get(name)
    if proc is None or proc.poll() is not None:
        kiln.start_worker(name)
        kiln.wait_for_worker(name)


class PgCluster:
    """A PostgreSQL server on a TCP port, run as an unprivileged user (pgserver's binaries)."""

    def __init__(self, root: Path) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.user: str | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
        self.data.mkdir()
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=utf8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin / tool), *args], check=True, capture_output=True,
                       timeout=60, user=self.user)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "log"), "-w",
                  "-o", options, "start")

    def stop(self) -> None:
        """Stop the server at once: sessions are cut, as when a database fails over."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """Stop the server without a checkpoint, whatever state it is in (for clean-up)."""
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, user=self.user, check=False)


@contextlib.contextmanager
def own_cluster(prefix: str) -> Iterator[PgCluster]:
    """Run a started PostgreSQL server of the caller's own (one it may stop and restart).

    Its directory is outside any private one: postgres runs as an unprivileged user.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    cluster = PgCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.kill()
        shutil.rmtree(root, ignore_errors=True)
