"""What the benchmarks run on: one PostgreSQL server, child processes, wrk, peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]


# -- PostgreSQL --------------------------------------------------------------------------

@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server: its URL and, when it runs here, its data directory."""

    url: str
    data_dir: Path | None = None

    def cpu_seconds(self) -> float | None:
        """Return the CPU time the server's processes used so far (None: not measurable)."""
        if self.data_dir is None:
            return None
        try:
            postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        # exited backends are in the postmaster's children's times
        total = cpu_seconds(postmaster, children=True) or 0.0
        for pid in descendants(postmaster):
            total += cpu_seconds(pid) or 0.0
        return total


@contextlib.contextmanager
def postgres(url: str | None = None) -> Iterator[Postgres]:
    """Yield a server: ``url`` if given, else an embedded server (pgserver) for the run."""
    if url:
        yield Postgres(url)
        return
    import pgserver

    # outside any private directory: postgres runs as an unprivileged system user
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-pg-"))
    root.chmod(0o755)
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    try:
        yield Postgres(server.get_uri(), root / "data")
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def database_url(server_url: str, name: str) -> str:
    """Return the URL of database ``name`` on the server of ``server_url``."""
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def fresh_database(server_url: str, name: str) -> str:
    """Drop and create database ``name``; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(server_url, name)


def server_version(url: str) -> str:
    """Return the server's version, e.g. ``16.2``."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


# -- child processes ---------------------------------------------------------------------

def free_port() -> int:
    """Return a TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """Return a clean environment for Kiln's processes: no config file, this checkout first."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/root"),
        "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp"),
        "PYTHONPATH": str(REPO),
        "GOTOOLCHAIN": "local",
        "CONFIG_PATH": "/dev/null",
        "KILN_LOGGING__LEVEL": "WARNING",
    }
    for name in ("DOCKER_HOST", "LANG"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


class Child:
    """A child process in its own session; stdout is either a log file or a JSON event pipe."""

    def __init__(self, name: str, argv: list[str], *, env: Mapping[str, str], logs: Path,
                 events: bool = False) -> None:
        self.name = name
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=dict(env), start_new_session=True,
            stdout=subprocess.PIPE if events else self._log, stderr=self._log)
        if events:
            threading.Thread(target=self._read, name=f"events-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Return the next event that matches, dropping the ones before it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.events.empty():
                raise RuntimeError(f"{self.name}: no expected event within {timeout}s; "
                                   f"log:\n{self.log()[-3000:]}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if match(event):
                return event

    def drain(self) -> None:
        """Drop the events received so far."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.events.get_nowait()

    def log(self) -> str:
        """Return what the process wrote to its log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """Return the process and its descendants."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def remove_tree(path: Path) -> None:
    """Remove a tree, including Go's read-only module cache directories."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Return the pids of every descendant of ``pid``.

    Each thread lists the children it started: go starts its compilers and linker from
    any of its threads, and a worker starts builds from its build threads.
    """
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(p) for p in
                        Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """Return the user + system CPU time of a live process (and its reaped children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float | None:
    """Return a live process's peak resident set size (VmHWM) in MiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else None


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout}s")
        time.sleep(0.1)


# -- wrk ---------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, *, connections: int, seconds: float, threads: int = 2,
        method: str = "GET") -> dict[str, Any]:
    """Run wrk against ``url``; return requests/s, bytes/s, latency percentiles (ms), errors."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    argv = [exe, "-t", str(min(threads, connections)), "-c", str(connections),
            "-d", f"{seconds:g}s", "--latency", "--timeout", "30s"]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-wrk-") as tmp:
        if method != "GET":
            script = Path(tmp) / "method.lua"
            script.write_text(f'wrk.method = "{method}"\n')
            argv += ["-s", str(script)]
        out = subprocess.run([*argv, url], capture_output=True, text=True, check=True,
                             timeout=seconds + 60).stdout
    result: dict[str, Any] = {"output": out}
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    result["bytes_per_s"] = float(match.group(1)) * _BYTES[match.group(2)] if match else 0.0
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if match:
            result[f"p{pct}_ms"] = _ms(match.group(1))
    match = re.search(r"(\d+) requests in", out)
    result["requests"] = int(match.group(1)) if match else 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    return result


def load_average() -> str:
    """Return the 1-minute load average."""
    return f"{os.getloadavg()[0]:.2f}"


def bench_queries() -> dict[str, str]:
    """Return the named queries of bench/queries.sql."""
    text = (Path(__file__).parent / "queries.sql").read_text()
    found: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        found[name.strip()] = body.strip().rstrip(";")
    return found


def latencies(url: str, *, method: str, seconds: float) -> dict[str, Any]:
    """Send requests one at a time on one keep-alive connection for ``seconds``.

    For HEAD, which wrk cannot time (it waits for a body a HEAD answer never has). The
    figures include this Python client's own time (about 0.1 ms a request).
    """
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    times: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            conn.request(method, target)
            resp = conn.getresponse()
            resp.read()
            times.append((time.perf_counter() - started) * 1000)
            if resp.status >= 400:
                errors += 1
    finally:
        conn.close()
    from bench.report import percentile

    return {"requests": len(times), "non_2xx": errors, "socket_errors": 0,
            "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90),
            "p99_ms": percentile(times, 99), "rps": len(times) / seconds}
