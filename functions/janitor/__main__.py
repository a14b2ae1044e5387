"""Run the janitor: migrations at start, then its jobs on their schedules (or once)."""

from __future__ import annotations

import argparse
import signal
import sys

from kiln.config import ConfigError, load_config
from kiln.janitor.scheduler import Janitor
from kiln.logconfig import setup_logging
from kiln.wiring import database_url


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the janitor."""
    parser = argparse.ArgumentParser(prog="python -m functions.janitor")
    parser.add_argument("--once", action="store_true",
                        help="run every due job once and exit (for a scheduled function "
                             "runtime); exit 1 if a job failed")
    parser.add_argument("--job", action="append", default=[], metavar="NAME",
                        help="with --once: run this job now, due or not (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(config.logging, process="janitor")
    janitor = Janitor.from_config(config, url=database_url(config))
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


if __name__ == "__main__":
    sys.exit(main())
