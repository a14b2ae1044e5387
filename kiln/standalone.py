"""``kiln serve``: the whole service on one machine — API, worker and janitor processes,
with an embedded PostgreSQL when no database URL is configured."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.config import Config, ServeConfig
from kiln.db.embedded import start_embedded_postgres
from kiln.db.migrate import migrate
from kiln.errors import KilnError

log = logging.getLogger(__name__)

#: seconds children get to exit after SIGTERM before they are killed
STOP_GRACE_SECONDS = 20.0
#: gunicorn's gthread worker, answering the requests gunicorn refuses itself (a URL over
#: 4 KiB, oversized headers) in Kiln's JSON error shape rather than HTML
WORKER_CLASS = "kiln.api.gunicorn_worker.ApiWorker"
#: seconds between looks at the children
POLL_SECONDS = 0.2


def child_environment(url: str) -> dict[str, str]:
    """Return the environment of the service's processes: ours plus the database URL."""
    env = dict(os.environ)
    env["KILN_DATABASE__URL"] = url
    return env


def gunicorn_command(config: Config) -> list[str]:
    """Return the gunicorn command line that serves the API."""
    return [
        sys.executable, "-m", "gunicorn", "functions.api:app",
        "--bind", config.api.listen,
        "--workers", str(config.api.processes),
        "--threads", str(config.api.threads),
        "--worker-class", WORKER_CLASS,
        "--timeout", "0",
        "--graceful-timeout", "10",
        "--keep-alive", "75",
        "--access-logfile", "-",
        "--logger-class", "kiln.logconfig.GunicornLogger",
    ]


def serve(config: Config) -> int:
    """Run API, worker and janitor, restarting any that exits, until a signal or a crash loop."""
    server = None
    url = config.database.url
    if not url:
        server, url = start_embedded_postgres(config.database.embedded_dir)
        log.info("embedded PostgreSQL running in %s", config.database.embedded_dir)
    applied = migrate(url, config.database)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    env = child_environment(url)
    if not config.signing.key and not config.signing.key_file:
        # standalone builds are signed too: with a key of its own, made once under var/
        from kiln.artifacts.signing import Signer, generate_key_file

        key_file = config.signing.generated_key_file.resolve()
        signer = Signer(generate_key_file(key_file))
        env["KILN_SIGNING__KEY_FILE"] = str(key_file)
        log.info("signing with %s (key id %s)", key_file, signer.key_id)
    commands = {
        "worker": [sys.executable, "-m", "functions.worker"],
        "janitor": [sys.executable, "-m", "functions.janitor"],
        "api": gunicorn_command(config),
    }
    supervisor = Supervisor(commands, env=env, config=config.serve)

    def on_signal(signum: int, frame: object) -> None:
        supervisor.stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, _, port = config.api.listen.rpartition(":")
    print(f"Kiln is serving at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        return supervisor.run()
    finally:
        if server is not None:
            server.cleanup()


@dataclass
class Child:
    """One supervised process and its restart history."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: when the next start is due (after an exit), or None while it runs
    due: float | None = None
    delay: float = 0.0
    restarts: deque[float] = field(default_factory=deque)


class CrashLoop(KilnError):
    """A child exited too often too soon: the service stops."""


class Supervisor:
    """Start the service's processes and keep them up until stopped.

    A child that exits is started again after a delay that doubles while it keeps
    exiting soon after each start; ``restart_limit`` restarts within ``restart_window``
    seconds are a crash loop, which stops everything with an error. Only ``stop`` (a
    signal) ends the service otherwise.
    """

    def __init__(self, commands: dict[str, list[str]], *, env: dict[str, str],
                 config: ServeConfig, clock: Callable[[], float] = time.monotonic,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.children = {name: Child(name, command) for name, command in commands.items()}
        self.env = env
        self.config = config
        self.clock = clock
        self.poll_seconds = poll_seconds
        self._stop_reason = ""

    def stop(self, reason: str) -> None:
        """Ask the loop to stop every child and return (safe from a signal handler)."""
        self._stop_reason = reason

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(child.command, env=self.env)
        child.started = self.clock()
        child.due = None
        log.info("%s started (pid %d)", child.name, child.process.pid)

    def _exited(self, child: Child, code: int, now: float) -> None:
        ran = now - child.started
        window = self.config.restart_window
        while child.restarts and now - child.restarts[0] > window:
            child.restarts.popleft()
        if len(child.restarts) >= self.config.restart_limit:
            raise CrashLoop(
                f"{child.name} exited {len(child.restarts) + 1} times within {window:g}s "
                f"(last exit status {code}): stopping Kiln; its output above says why"
            )
        if ran >= self.config.stable_seconds or child.delay == 0:
            child.delay = self.config.restart_delay
        else:
            child.delay = min(child.delay * 2, self.config.restart_max_delay)
        child.restarts.append(now)
        child.due = now + child.delay
        log.error("%s exited with status %s after %.1fs; starting it again in %.1fs",
                  child.name, code, ran, child.delay)

    def run(self) -> int:
        """Supervise until stopped; return 0 after a stop, 1 after a crash loop."""
        code = 0
        try:
            for child in self.children.values():
                self._start(child)
            while not self._stop_reason:
                now = self.clock()
                for child in self.children.values():
                    if child.process is not None and child.due is None:
                        status = child.process.poll()
                        if status is not None:
                            self._exited(child, status, now)
                    elif child.due is not None and now >= child.due:
                        self._start(child)
                time.sleep(self.poll_seconds)
            log.info("stopping (%s)", self._stop_reason)
        except CrashLoop as exc:
            log.error("%s", exc)
            code = 1
        finally:
            self._terminate()
        return code

    def _terminate(self) -> None:
        running = [c.process for c in self.children.values()
                   if c.process is not None and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
