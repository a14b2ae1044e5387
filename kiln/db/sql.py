"""Named queries from the .sql files of kiln/db/sql/."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources


@cache
def queries(filename: str = "builds.sql") -> dict[str, str]:
    """Return the named queries of ``kiln/db/sql/<filename>``."""
    text = resources.files("kiln.db").joinpath(f"sql/{filename}").read_text()
    found: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        found[name.strip()] = body.strip().rstrip(";")
    return found
