"""``kiln serve``: the whole service on one machine — API, worker and janitor processes,
with an embedded PostgreSQL when no database URL is configured."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiln.config import Config
from kiln.db import migrate

log = logging.getLogger(__name__)

#: seconds children get to exit after SIGTERM before they are killed
STOP_GRACE_SECONDS = 20.0


def start_embedded_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) an embedded PostgreSQL in ``data_dir``; return (server, url)."""
    try:
        import pgserver
    except ImportError:
        raise SystemExit(
            "no database.url and pgserver is not installed: `pip install pgserver`, "
            "or set database.url"
        ) from None
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    return server, server.get_uri()


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
        "--worker-class", "gthread",
        "--timeout", "0",
        "--graceful-timeout", "10",
        "--keep-alive", "75",
        "--access-logfile", "-",
        "--logger-class", "kiln.logconfig.GunicornLogger",
    ]


def serve(config: Config) -> int:
    """Run API, worker and janitor until interrupted."""
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
        from kiln.signing import Signer, generate_key_file

        key_file = config.signing.generated_key_file.resolve()
        signer = Signer(generate_key_file(key_file))
        env["KILN_SIGNING__KEY_FILE"] = str(key_file)
        log.info("signing with %s (key id %s)", key_file, signer.key_id)
    commands = {
        "worker": [sys.executable, "-m", "functions.worker"],
        "janitor": [sys.executable, "-m", "functions.janitor"],
        "api": gunicorn_command(config),
    }
    children = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, _, port = config.api.listen.rpartition(":")
    print(f"Kiln is serving at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    code = 0
    try:
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    log.error("%s exited with %s; stopping", name, child.returncode)
                    code = 1
                    stopping = True
            time.sleep(0.5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in children.values():
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.cleanup()
    return code
