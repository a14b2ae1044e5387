"""A real Kiln worker with a no-op build: ``python -m bench.kiln_worker URL --concurrency N``.

Claims, leases, completions, LISTEN and the claim loop are Kiln's own (kiln.worker.loop.Worker,
kiln.db.builds.QueueManager); only the build (a no-op that returns a one-byte binary) and the
store (which keeps nothing) are stand-ins, so what is measured is the queue path. With
``--events`` it prints one JSON line per claim and completion (always one when it LISTENs), with the time of
``time.monotonic()`` (one clock for every process of the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from kiln.artifacts.store import StoredArtifact, artifact_prefix
from kiln.config import DatabaseConfig
from kiln.db.builds import Claimed, QueueManager
from kiln.db.pool import connect_kwargs, make_pool
from kiln.worker.builder import BuildOutput
from kiln.worker.loop import Worker

GO_VERSION = "go1.27.3"
SANDBOX = "bench:noop"

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Print one event line (thread-safe)."""
    line = json.dumps({"event": event, "t": time.monotonic(), **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class ReportingQueue(QueueManager):
    """Kiln's queue manager, reporting when claims and completions return."""

    def claim(self, worker_id: str, *, limit: int, lease_seconds: float,
              sandbox: str | None = None, go_version: str | None = None) -> list[Claimed]:
        claimed = super().claim(worker_id, limit=limit, lease_seconds=lease_seconds,
                                sandbox=sandbox, go_version=go_version)
        emit("claim", keys=[c.key for c in claimed])
        return claimed

    def complete(self, key: str, worker_id: str, *, artifact_path: str, artifact_size: int,
                 artifact_sha256: str, attempt: int | None = None) -> bool:
        done = super().complete(key, worker_id, artifact_path=artifact_path,
                                artifact_size=artifact_size, artifact_sha256=artifact_sha256,
                                attempt=attempt)
        emit("complete", key=key)
        return done


class ReportingConnection(psycopg.Connection):  # type: ignore[type-arg]
    """A LISTEN connection that reports once it listens."""

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        cur = super().execute(query, *args, **kwargs)
        if isinstance(query, str) and query.startswith("LISTEN"):
            emit("listening")
        return cur


class NoopSandbox:
    identity = SANDBOX

    def go_version(self) -> str:
        return GO_VERSION

    def cleanup_orphans(self) -> int:
        return 0


class NoopBuilder:
    """Return the same one-byte binary for every build, at once."""

    def __init__(self, binary: Path) -> None:
        self.sandbox = NoopSandbox()
        self.binary = binary

    def build(self, spec: Any, *, key: str, workdir: Path, log: Any,
              cancel: threading.Event | None = None) -> BuildOutput:
        return BuildOutput(binary=self.binary, go_mod="", go_sum="")


class NullStore:
    """Keep nothing: the benchmark measures the queue, not the disk."""

    def put(self, key: str, name: str, source: Path, *, sha256: str) -> StoredArtifact:
        return StoredArtifact(path=artifact_prefix(key) + name, size=1, sha256=sha256)


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.kiln_worker")
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--events", action="store_true", help="print claim/complete events")
    args = parser.parse_args(argv)
    config = DatabaseConfig()
    # the pool kiln.wiring.make_worker opens
    pool = make_pool(args.url, config, application="kiln-worker", min_size=1,
                     max_size=max(2, args.concurrency + 2), synchronous_commit=False)
    queue = ReportingQueue(pool) if args.events else QueueManager(pool)

    def listen() -> psycopg.Connection:
        # the same connection kiln.wiring.make_worker opens; it reports when it listens
        return ReportingConnection.connect(
            args.url, autocommit=True,
            **connect_kwargs(config, application="kiln-worker-listen"))  # type: ignore[arg-type]

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-worker-"))
    binary = work / "caddy"
    binary.write_bytes(b"\0")
    worker = Worker(queue=queue, builder=NoopBuilder(binary),  # type: ignore[arg-type]
                    store=NullStore(), listen=listen,  # type: ignore[arg-type]
                    work_root=work / "work", concurrency=args.concurrency)

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    emit("ready", pid=os.getpid())
    try:
        worker.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
