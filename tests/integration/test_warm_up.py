"""worker.warm_up: a starting worker restores the fleet caches of the most downloaded builds.

The real Worker on a real PostgreSQL with a real Builder (process sandbox, synthetic module
proxy, fleet build cache and module sets in one store directory). Worker a builds a spec
that users then download; a fresh worker b, whose module proxy does not answer, starts with
warm_up 1: before it claims anything its disk holds that build's modules and compiled
packages, and it builds the same plugins for another platform without a fetch step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.artifacts.local import LocalStore
from kiln.buildcache.blobs import DirectoryBlobs
from kiln.buildcache.cache import BuildCache
from kiln.db.builds import QueueManager
from kiln.modproxy.modsets import ModuleSets
from kiln.modproxy.store import ModuleStore, objects_of
from kiln.worker.builder import Builder
from kiln.worker.loop import Worker
from tests.fixtures import goproxy as gp
from tests.integration.test_buildcache import cacheprog, sockets  # noqa: F401 (fixtures)
from tests.integration.test_modsets import DEAD_PROXY
from tests.integration.test_trim import BUILD_SECONDS, Running, pool, spec, state  # noqa: F401
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox
from tests.service import wait_for

pytestmark = pytest.mark.slow


def worker(name: str, root: Path, db_url: str, conns: ConnectionPool, program: Path,
           socket_dir: Path, goproxy: str, warm_up: int = 0) -> tuple[Worker, BuildCache,
                                                                     ModuleSets]:
    sandbox = process_sandbox(root / name / "go")
    cache = BuildCache(directory=root / name / "buildcache",
                       store=DirectoryBlobs(root / "store" / "buildcache"), program=program,
                       socket_dir=socket_dir / name)
    sets = ModuleSets(ModuleStore(objects_of(LocalStore(root / "store"))),
                      modcache=sandbox.modcache)
    builder = Builder(sandbox=sandbox, goproxy=goproxy, gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS,
                      compile_timeout=COMPILE_TIMEOUT_SECONDS, buildcache=cache, modsets=sets)
    return Worker(queue=QueueManager(conns), builder=builder,
                  store=LocalStore(root / "artifacts"),
                  listen=lambda: psycopg.connect(db_url, autocommit=True),
                  work_root=root / name / "work", worker_id=name, concurrency=1,
                  poll_seconds=0.2, warm_up=warm_up), cache, sets


def test_a_starting_worker_warms_up_with_the_most_downloaded_build(
        db_url: str, pool: ConnectionPool, tmp_path: Path, proxy_dir: Path,  # noqa: F811
        cacheprog: Path, sockets: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    queue = QueueManager(pool)
    a, _, a_sets = worker("a", tmp_path, db_url, pool, cacheprog, sockets,
                          f"file://{proxy_dir}")
    popular = spec(a.builder.sandbox, gp.HELLO_VERSIONS[0])  # type: ignore[arg-type]
    queue.enqueue(popular.key(), popular.to_dict(), max_attempts=1)
    caplog.set_level(logging.INFO, logger="kiln.worker.loop")
    running = Running(a)
    try:
        wait_for("the build", lambda: state(queue, popular) == "succeeded", BUILD_SECONDS, 0.2)
        wait_for("the build shared", lambda: any(
            f"build {popular.key()}: shared" in r.getMessage() for r in caplog.records), 60, 0.1)
    finally:
        running.stop()
    queue.record_download(popular.key())

    b, b_cache, b_sets = worker("b", tmp_path, db_url, pool, cacheprog, sockets, DEAD_PROXY,
                                warm_up=1)
    tree = b_sets.modcache / f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"
    assert not tree.exists()
    running = Running(b)
    try:
        warmed = wait_for("the warm-up", lambda: [
            r.getMessage() for r in caplog.records if "warmed up" in r.getMessage()], 120, 0.1)
        assert "warmed up with 1 of the 1 most downloaded builds" in warmed[0], warmed
        # before any build: the modules and the compiled packages of the popular build
        assert tree.is_dir()
        assert b_cache.stats["prefetched"] > 100, b_cache.stats
        other = spec(b.builder.sandbox, gp.HELLO_VERSIONS[0], arch="arm64")  # type: ignore[arg-type]
        queue.enqueue(other.key(), other.to_dict(), max_attempts=1)
        wait_for("the other platform", lambda: state(queue, other) in (
            "succeeded", "failed"), BUILD_SECONDS, 0.2)
        build = queue.get(other.key())
        assert build is not None and build.state == "succeeded", build
    finally:
        running.stop()
    assert a_sets.modcache != b_sets.modcache
