"""The worker and the janitor as programs: arguments, config, logging, signals, exit codes.

``kiln worker`` and ``kiln janitor`` run them, as do the entry points
``python -m functions.worker`` and ``python -m functions.janitor`` (the images' commands).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from kiln.config import Config, ConfigError, load_config
from kiln.logconfig import setup_logging
from kiln.readiness import NotReady, wait_ready
from kiln.wiring import (
    database_url,
    make_dependencies,
    make_detectors,
    make_janitor,
    make_worker,
)
from kiln.worker.preemption import PreemptionMonitor
from kiln.worker.sandbox.base import SandboxError

log = logging.getLogger("kiln.worker")


def _configured(process: str) -> Config | None:
    """Load the configuration and set up logging; None (said on stderr) if it is wrong."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    setup_logging(config.logging, process=process)
    return config


def worker_main(argv: list[str] | None = None, *, prog: str = "kiln worker") -> int:
    """Parse arguments, wire a worker from the config and run it."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--max-jobs", type=int, default=0,
                        help="exit after this many builds (0: never)")
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="exit after this many seconds with nothing to do (0: never)")
    args = parser.parse_args(argv)
    config = _configured("worker")
    if config is None:
        return 2
    try:
        # a stack started together (compose, a fresh node) may bring the database, the
        # store or the engine up after the worker: wait for them, saying which and why
        wait_ready(make_dependencies(config, "worker", url=database_url(config)), role="worker",
                   timeout=config.worker.start_timeout)
    except NotReady as exc:
        log.error("%s", exc)
        return 2
    try:
        worker: Any = make_worker(config, max_jobs=args.max_jobs, idle_exit=args.idle_exit)
    except SandboxError as exc:  # no engine, no image, a bad sandbox setting: say which
        log.error("cannot start the worker: %s", exc)
        return 2
    # a preemption notice or a drain signal stops claiming and hands running builds back
    preemption = config.worker.preemption
    monitor = PreemptionMonitor(make_detectors(preemption),
                                on_notice=lambda notice: worker.stop(),
                                poll_seconds=preemption.poll_seconds)
    if monitor.check() is not None:
        # started on an instance that is already being reclaimed: take no build
        log.warning("preemption notice before start (%s): not starting", monitor.notice)
        monitor.acknowledge()
        return 0
    monitor.install_signal_handlers()
    monitor.start()
    worker.run()
    monitor.stop()
    if monitor.notice is not None and monitor.noticed_at is not None:
        log.info("drained %.2fs after the notice (%s: %s)",
                 monitor.clock() - monitor.noticed_at, monitor.notice.source,
                 monitor.notice.detail)
        monitor.acknowledge()
    return 0


def janitor_main(argv: list[str] | None = None, *, prog: str = "kiln janitor") -> int:
    """Parse arguments and run the janitor."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--once", action="store_true",
                        help="run every due job once and exit (for a scheduled function "
                             "runtime); exit 1 if a job failed")
    parser.add_argument("--job", action="append", default=[], metavar="NAME",
                        help="with --once: run this job now, due or not (repeatable)")
    args = parser.parse_args(argv)
    config = _configured("janitor")
    if config is None:
        return 2
    janitor = make_janitor(config, url=database_url(config))
    if args.job and not args.once:
        parser.error("--job needs --once")
    if args.once:
        try:
            outcomes = janitor.run_once(only=args.job)
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        return 1 if "failed" in outcomes.values() else 0
    signal.signal(signal.SIGTERM, lambda *_: janitor.stop())
    signal.signal(signal.SIGINT, lambda *_: janitor.stop())
    janitor.run_forever()
    return 0
