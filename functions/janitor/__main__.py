"""Run the janitor: migrations at start, then its jobs on their schedules (or once)."""

from __future__ import annotations

import sys

from kiln.programs import janitor_main


def main(argv: list[str] | None = None) -> int:
    """Run the janitor (kiln/programs.py)."""
    return janitor_main(argv, prog="python -m functions.janitor")


if __name__ == "__main__":
    sys.exit(main())
