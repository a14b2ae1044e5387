"""Copy bench/results.md into the README's Benchmarks section: ``python -m bench.readme``.

Only the text between the ``<!-- bench:results -->`` and ``<!-- /bench:results -->``
markers changes; run it after a full ``make bench`` whose figures are to be published.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench:results -->", "<!-- /bench:results -->"


def splice(readme: str, table: str) -> str:
    """Return ``readme`` with the text between the markers replaced by ``table``."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    return pattern.sub(lambda _: f"{BEGIN}\n{table.rstrip()}\n{END}", readme, count=1)


def main() -> int:
    """Splice bench/results.md into README.md."""
    readme = HERE.parent / "README.md"
    readme.write_text(splice(readme.read_text(), (HERE / "results.md").read_text()))
    print(f"updated {readme} from {HERE / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
