"""Run a build worker until SIGTERM/SIGINT (or max-jobs / idle-exit)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from kiln.app import make_worker
from kiln.config import ConfigError, load_config
from kiln.logconfig import setup_logging


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
    worker: Any = make_worker(config, max_jobs=args.max_jobs, idle_exit=args.idle_exit)

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
