"""Run Kiln's real processes for end-to-end tests: gunicorn on 127.0.0.1, workers, janitor."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from kiln.standalone import WORKER_CLASS

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


def database_url(server_url: str, dbname: str) -> str:
    """Return ``server_url`` pointing at database ``dbname``."""
    import psycopg

    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def template_database(server_url: str, template: str, name: str) -> str:
    """(Re)create database ``name`` as a copy of ``template``; return its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return database_url(server_url, name)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something true; return that, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def free_port() -> int:
    """Return a TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KilnProcesses:
    """Start and stop the API (gunicorn), workers and janitors of one Kiln instance."""

    def __init__(self, *, db_url: str, root: Path, goproxy: str, cache_dir: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.db_url = db_url
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp"),
            "PYTHONPATH": str(REPO),
            "CONFIG_PATH": "/dev/null",
            "KILN_DATABASE__URL": db_url,
            "KILN_BUILD__GOPROXY": goproxy,
            "KILN_BUILD__GOSUMDB": "off",
            "KILN_BUILD__SANDBOX": "process",
            "KILN_BUILD__CACHE_DIR": str(cache_dir),
            "KILN_BUILD__WORK_DIR": str(root / "work"),
            "KILN_STORAGE__LOCAL__PATH": str(root / "artifacts"),
            "KILN_API__LISTEN": f"127.0.0.1:{self.port}",
            "KILN_WORKER__POLL_SECONDS": "1",
            "KILN_WORKER__HEARTBEAT_SECONDS": "1",
            "KILN_WORKER__LEASE_SECONDS": "5",
            "KILN_WORKER__RETRY_BASE_SECONDS": "0.5",
            "KILN_LOGGING__LEVEL": "DEBUG",
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_api(self, *, workers: int = 1, threads: int = 32,
                  worker_class: str = WORKER_CLASS, env: Mapping[str, str] | None = None,
                  name: str = "api") -> None:
        """Start gunicorn serving functions.api:app and wait until /healthz answers."""
        # the held-request caps are derived from api.threads: unless a test sets it, make it
        # the number of threads gunicorn runs
        if "KILN_API__THREADS" not in {**self.env, **(env or {})}:
            env = {"KILN_API__THREADS": str(threads), **(env or {})}
        self._spawn(name, [
            sys.executable, "-m", "gunicorn", "functions.api:app",
            "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--threads", str(threads), "--worker-class", worker_class, "--timeout", "0",
        ], env)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /healthz answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the API did not come up; log:\n{self.log('api')}")

    def start_worker(self, name: str = "worker", *, args: list[str] | None = None,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m functions.worker``."""
        return self._spawn(name, [sys.executable, "-m", "functions.worker", *(args or [])], env)

    def start_janitor(self, name: str = "janitor", *, args: list[str] | None = None,
                      env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m functions.janitor``."""
        return self._spawn(name, [sys.executable, "-m", "functions.janitor", *(args or [])],
                           env)

    def wait_for_worker(self, name: str = "worker", timeout: float = START_TIMEOUT) -> None:
        """Wait until worker process ``name`` has registered and is claiming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready: concurrency" in self.log(name):
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"worker {name} did not start; log:\n{self.log(name)}")

    def log(self, name: str) -> str:
        """Return what a process printed so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal one process group and wait for it; return its exit code."""
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    @contextlib.contextmanager
    def running(self) -> Iterator[KilnProcesses]:
        """Start a worker and the API (once the worker is claiming); stop all on exit."""
        try:
            self.start_worker()
            self.wait_for_worker()
            self.start_api()
            yield self
        finally:
            self.close()

    def close(self) -> None:
        """Stop everything."""
        for name in list(self.procs):
            self.stop(name, timeout=15)

    # client helpers -------------------------------------------------------------------

    def post_build(self, body: Any, **kwargs: Any) -> requests.Response:
        """POST /api/builds."""
        return requests.post(self.url + "/api/builds", json=body, timeout=60, **kwargs)

    def download(self, doc: Mapping[str, Any], dest: Path) -> Path:
        """Download a succeeded build's artifact, check its sha256, make it executable."""
        resp = requests.get(f"{self.url}/api/builds/{doc['key']}/artifact", timeout=120)
        assert resp.status_code == 200, resp.text
        assert hashlib.sha256(resp.content).hexdigest() == doc["artifact"]["sha256"]
        dest.write_bytes(resp.content)
        dest.chmod(dest.stat().st_mode | stat.S_IXUSR)
        return dest

    def wait_build(self, key: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll a build until it reaches a final state; return its document."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = requests.get(f"{self.url}/api/builds/{key}", timeout=10).json()
            if doc.get("state") in ("succeeded", "failed", "cancelled"):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"build {key} still {doc.get('state')}; worker log:\n"
                             + self.log("worker")[-4000:])
