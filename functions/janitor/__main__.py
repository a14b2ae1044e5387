"""Run the janitor: migrations at start, then its jobs on their schedules (or once)."""

from __future__ import annotations

import argparse
import signal
import sys

from kiln.app import database_url
from kiln.config import ConfigError, load_config
from kiln.janitor import Janitor
from kiln.logconfig import setup_logging


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the janitor."""
    parser = argparse.ArgumentParser(prog="python -m functions.janitor")
    parser.add_argument("--once", action="store_true",
                        help="run every job once and exit (for a scheduled function runtime)")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(config.logging, process="janitor")
    janitor = Janitor.from_config(config, url=database_url(config))
    if args.once:
        janitor.run_once()
        return 0
    signal.signal(signal.SIGTERM, lambda *_: janitor.stop())
    signal.signal(signal.SIGINT, lambda *_: janitor.stop())
    janitor.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
