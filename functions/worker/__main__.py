"""Run a build worker until a preemption notice or a drain signal (or max-jobs, idle-exit)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from kiln.config import ConfigError, load_config
from kiln.logconfig import setup_logging
from kiln.readiness import NotReady, dependencies, wait_ready
from kiln.wiring import database_url, make_worker
from kiln.worker.preemption import PreemptionMonitor, detectors_from_config
from kiln.worker.sandbox import SandboxError

log = logging.getLogger("kiln.worker")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, wire a worker from the config and run it."""
    parser = argparse.ArgumentParser(prog="python -m functions.worker")
    parser.add_argument("--max-jobs", type=int, default=0,
                        help="exit after this many builds (0: never)")
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="exit after this many seconds with nothing to do (0: never)")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(config.logging, process="worker")
    try:
        # a stack started together (compose, a fresh node) may bring the database, the
        # store or the engine up after the worker: wait for them, saying which and why
        wait_ready(dependencies(config, "worker", url=database_url(config)), role="worker",
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
    monitor = PreemptionMonitor(detectors_from_config(preemption),
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


if __name__ == "__main__":
    sys.exit(main())
