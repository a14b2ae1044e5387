"""An embedded PostgreSQL (pgserver) for `kiln serve` and `kiln keys`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def start_embedded_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) an embedded PostgreSQL in ``data_dir``; return (server, url)."""
    try:
        import pgserver
    except ImportError:
        raise SystemExit(
            "no database.url and pgserver is not installed: `pip install pgserver`, "
            "or set database.url"
        ) from None
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    return server, server.get_uri()
