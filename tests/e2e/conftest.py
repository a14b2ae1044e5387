"""The ``kiln`` fixture: one Kiln (API, worker) per test module, on its own database.

A module changes what differs by overriding the fixture it is built from, at module scope:
``kiln_env`` (settings), ``kiln_goproxy`` and ``kiln_cache_dir`` (where Go fetches from and
caches into), ``kiln_db`` (the database) and ``kiln_start`` (which processes to start, and
how). The defaults: the synthetic proxy as a file:// URL, the shared Go caches, a fresh copy
of the template database named after the module, one worker and then the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.service import KilnProcesses, template_database

Start = Callable[[KilnProcesses], None]


def _module_name(request: pytest.FixtureRequest) -> str:
    """Return the requesting module's name without its ``test_`` prefix."""
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")


@pytest.fixture(scope="module")
def kiln_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Return the module's Kiln directory (work dirs, artifacts, logs, files it reads)."""
    return tmp_path_factory.mktemp(_module_name(request))


@pytest.fixture(scope="module")
def kiln_db(pg_server_url: str, pg_template: str, request: pytest.FixtureRequest) -> str:
    """Return the URL of a fresh copy of the template database, ``kiln_<module>``."""
    return template_database(pg_server_url, pg_template, f"kiln_{_module_name(request)}")


@pytest.fixture(scope="module")
def kiln_goproxy(proxy_dir: Path) -> str:
    """Return the GOPROXY Kiln builds from: the synthetic proxy's tree."""
    return f"file://{proxy_dir}"


@pytest.fixture(scope="module")
def kiln_cache_dir(go_cache_dir: Path) -> Path:
    """Return Kiln's Go module and build cache: the one shared by the session."""
    return go_cache_dir


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    """Return settings added to (or overriding) KilnProcesses' defaults."""
    return {}


def start_worker_then_api(service: KilnProcesses) -> None:
    """Start a worker and, once it claims, the API (the API keys builds by its toolchain)."""
    service.start_worker()
    service.wait_for_worker()
    service.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Start:
    """Return what starts the module's Kiln processes."""
    return start_worker_then_api


@pytest.fixture(scope="module")
def kiln(kiln_root: Path, kiln_db: str, kiln_goproxy: str, kiln_cache_dir: Path,
         kiln_env: dict[str, str], kiln_start: Start) -> Iterator[KilnProcesses]:
    """Run one Kiln for the module; stop all its processes afterwards."""
    service = KilnProcesses(db_url=kiln_db, root=kiln_root, goproxy=kiln_goproxy,
                            cache_dir=kiln_cache_dir, env=kiln_env)
    try:
        kiln_start(service)
        yield service
    finally:
        service.close()
