"""procrastinate's worker with a no-op task: ``python -m bench.procrastinate_worker URL``.

The peer of bench.kiln_worker: procrastinate (from PyPI, ``pip install '.[bench]'``) runs
its own worker against its own schema, in its own database on the same server. With
``--events`` it prints the same JSON lines as bench.kiln_worker: when a fetch returns a
job (``claim``) or nothing, when a job is finished (``complete``) and when it listens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import procrastinate

TASK = "bench_noop"
_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Print one event line."""
    line = json.dumps({"event": event, "t": time.monotonic(), **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def make_app(connector: Any) -> procrastinate.App:
    """Return the app with the no-op task."""
    app = procrastinate.App(connector=connector)

    @app.task(name=TASK)
    async def bench_noop(i: int = 0) -> None:
        return None

    return app


def instrument(app: procrastinate.App, *, events: bool) -> None:
    """Report fetches, finishes and LISTEN through ``emit``."""
    connector: Any = app.connector
    loop_notify = connector._loop_notify

    async def reporting_loop_notify(*args: Any, **kwargs: Any) -> None:
        emit("listening")
        await loop_notify(*args, **kwargs)

    connector._loop_notify = reporting_loop_notify
    if not events:
        return
    manager: Any = app.job_manager
    fetch_job = manager.fetch_job
    finish_job = manager.finish_job

    async def reporting_fetch_job(*args: Any, **kwargs: Any) -> Any:
        job = await fetch_job(*args, **kwargs)
        emit("claim", keys=[str(job.id)] if job is not None else [])
        return job

    async def reporting_finish_job(job: Any, *args: Any, **kwargs: Any) -> Any:
        result = await finish_job(job, *args, **kwargs)
        emit("complete", key=str(job.id))
        return result

    manager.fetch_job = reporting_fetch_job
    manager.finish_job = reporting_finish_job


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM (its own signal handling)."""
    parser = argparse.ArgumentParser(prog="python -m bench.procrastinate_worker")
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--events", action="store_true")
    parser.add_argument("--async-commit", action="store_true",
                        help="synchronous_commit=off on its connections, as Kiln's worker")
    args = parser.parse_args(argv)
    connection = {"options": "-c synchronous_commit=off"} if args.async_commit else {}
    app = make_app(procrastinate.PsycopgConnector(conninfo=args.url, kwargs=connection))
    instrument(app, events=args.events)
    emit("ready", pid=os.getpid())
    # procrastinate's defaults: LISTEN/NOTIFY, a 5 s polling fallback (like Kiln's)
    app.run_worker(concurrency=args.concurrency, wait=True, listen_notify=True,
                   fetch_job_polling_interval=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
