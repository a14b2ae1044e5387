"""Run a build worker until a preemption notice or a drain signal (or max-jobs, idle-exit)."""

from __future__ import annotations

import sys

from kiln.programs import worker_main


def main(argv: list[str] | None = None) -> int:
    """Run the worker (kiln/programs.py)."""
    return worker_main(argv, prog="python -m functions.worker")


if __name__ == "__main__":
    sys.exit(main())
