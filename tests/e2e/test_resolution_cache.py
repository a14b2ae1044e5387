"""The resolution cache production runs: "latest" shared by every API process, in PostgreSQL.

Two API processes (gunicorn each, as two API machines would be) serve one database and the
synthetic module proxy as they are configured in a deployment (``functions.api:app``, whose
wiring gives the resolver the PostgreSQL cache). Process A resolves a plugin's "latest";
the proxy then publishes a newer release. Within ``build.latest_ttl``, process B, which
has never resolved it, answers the version A resolved, although B's own version list
already shows the new release; once the TTL has passed, both answer the new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, wait_for

#: build.latest_ttl of both processes: far longer than the few requests made within it
LATEST_TTL = 20
NEW_HELLO = "v0.3.0"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a proxy tree of the module's own: a test publishes into it."""
    return gp.generate(tmp_path_factory.mktemp("resolution-proxy"))


@pytest.fixture(scope="module")
def kiln_goproxy(proxy: Path) -> str:
    return f"file://{proxy}"


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_BUILD__LATEST_TTL": str(LATEST_TTL)}


def start_api_only(service: KilnProcesses) -> None:
    """Start the API alone: resolving versions needs no worker."""
    service.start_api(threads=4)


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_api_only


@pytest.fixture(scope="module")
def other_api(kiln: KilnProcesses, kiln_root: Path, kiln_goproxy: str, kiln_cache_dir: Path,
              kiln_env: dict[str, str]) -> Iterator[KilnProcesses]:
    """A second API process on another port, on the same database and proxy."""
    service = KilnProcesses(db_url=kiln.db_url, root=kiln_root / "b", goproxy=kiln_goproxy,
                            cache_dir=kiln_cache_dir, env=kiln_env)
    try:
        service.start_api(threads=4)
        yield service
    finally:
        service.close()


def plugin_versions(api: KilnProcesses) -> dict[str, Any]:
    """Ask an API what the web page's plugin picker asks: a plugin's latest and versions."""
    resp = requests.get(api.url + "/api/plugin-versions", params={"path": gp.HELLO},
                        timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_latest_is_shared_by_api_processes_until_its_ttl_passes(
        kiln: KilnProcesses, other_api: KilnProcesses, proxy: Path) -> None:
    a, b = kiln, other_api
    resolved_at = time.time()
    first = plugin_versions(a)
    assert first["latest"] == gp.HELLO_LATEST
    assert first["versions"][0] == gp.HELLO_LATEST

    gp.publish(proxy, gp.HELLO, NEW_HELLO)
    seen_by_b = plugin_versions(b)
    asked_after = time.time() - resolved_at
    # B lists the new release (it reads the proxy's list itself) but answers the "latest"
    # A resolved: it took it from the shared cache
    assert seen_by_b["versions"][0] == NEW_HELLO
    assert seen_by_b["latest"] == gp.HELLO_LATEST, (
        f"B asked {asked_after:.1f}s after A resolved (build.latest_ttl {LATEST_TTL}s)")
    with psycopg.connect(kiln.db_url) as conn:
        stored = conn.execute("SELECT version FROM kiln_resolutions WHERE module = %s "
                              "AND query = 'latest'", (gp.HELLO,)).fetchall()
    assert stored == [(gp.HELLO_LATEST,)]

    # once the TTL has passed, each process asks the proxy again
    wait_for("B to answer the new latest", lambda: plugin_versions(b)["latest"] == NEW_HELLO,
             timeout=LATEST_TTL + 30, interval=0.5)
    assert plugin_versions(a)["latest"] == NEW_HELLO
