"""build.cache_max_bytes: an idle worker trims its Go caches to the limit, and builds on.

The first test runs the real Worker on a real PostgreSQL with a real Builder: the process
sandbox, the synthetic module proxy and the fleet build cache (its cache program as
GOCACHEPROG). The second one holds a scripted build (tests/integration/test_worker.py) to
show that a worker running a build never trims.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.artifacts.local import LocalStore
from kiln.buildcache.blobs import DirectoryBlobs
from kiln.buildcache.cache import BuildCache
from kiln.config import Config
from kiln.db.builds import QueueManager
from kiln.metrics import KilnCollector, MetricsRecorder
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.wiring import make_trimmer
from kiln.worker.builder import Builder
from kiln.worker.loop import Worker
from kiln.worker.sandbox.process import ProcessSandbox
from kiln.worker.trim import CacheTrimmer
from tests.fixtures import goproxy as gp
from tests.integration.test_buildcache import cacheprog, sockets  # noqa: F401 (fixtures)
from tests.integration.test_worker import Hold, Kiln, kiln, spec_of  # noqa: F401 (fixture)
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox
from tests.service import wait_for

#: a build of the synthetic Caddy takes seconds; a cold one on a busy machine, more
BUILD_SECONDS = 300.0
#: the caches' limit: far below what two builds leave (Go's standard library alone,
#: compiled, takes tens of MB), above what is never trimmed (Go's 256 cache directories)
LIMIT = 4 * 1024 * 1024
DONE = ("succeeded", "failed", "cancelled")


def du(*paths: Path) -> int:
    """Return the bytes ``paths`` take on disk, as the du program counts them."""
    out = subprocess.run(["du", "-s", "-B1", "-c", *map(str, paths)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def spec(sandbox: ProcessSandbox, hello: str, arch: str = "amd64") -> BuildSpec:
    return BuildSpec(os="linux", arch=arch, arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO, version=hello),),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)


def trimmed_bytes(pool: ConnectionPool) -> dict[str, float]:
    """Return kiln_worker_cache_trimmed_bytes_total by cache, as /metrics shows it."""
    for family in KilnCollector(pool).collect():
        if family.name == "kiln_worker_cache_trimmed_bytes":
            return {s.labels["cache"]: s.value for s in family.samples
                    if s.name == "kiln_worker_cache_trimmed_bytes_total"}
    return {}


class Running:
    """A Worker's run() in a thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(db_url, min_size=1, max_size=6, kwargs={"autocommit": True}) as p:
        yield p


@pytest.mark.slow
def test_an_idle_worker_trims_its_caches_to_the_limit_and_builds_again(
        db_url: str, pool: ConnectionPool, tmp_path: Path, proxy_dir: Path, cacheprog: Path,  # noqa: F811
        sockets: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    sandbox = process_sandbox(tmp_path / "go")
    cache = BuildCache(directory=tmp_path / "buildcache",
                       store=DirectoryBlobs(tmp_path / "store" / "buildcache"),
                       program=cacheprog, socket_dir=sockets / "w")
    builder = Builder(sandbox=sandbox, goproxy=f"file://{proxy_dir}", gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS,
                      compile_timeout=COMPILE_TIMEOUT_SECONDS, buildcache=cache)
    recorder = MetricsRecorder(pool)
    trimmer = make_trimmer(Config.model_validate({"build": {"cache_max_bytes": LIMIT}}),
                           sandbox=sandbox, buildcache=cache, counters=recorder)
    assert trimmer is not None
    caches = (sandbox.modcache, sandbox.buildcache, cache.actions, cache.outputs)
    queue = QueueManager(pool)
    worker = Worker(queue=queue, builder=builder, store=LocalStore(tmp_path / "artifacts"),
                    listen=lambda: psycopg.connect(db_url, autocommit=True),
                    work_root=tmp_path / "work", worker_id="trimming", concurrency=1,
                    poll_seconds=0.2, trimmer=trimmer, trim_seconds=0.2)
    first, second = spec(sandbox, gp.HELLO_VERSIONS[0]), spec(sandbox, gp.HELLO_VERSIONS[1])
    for s in (first, second):
        queue.enqueue(s.key(), s.to_dict(), max_attempts=1)
    hello_first = sandbox.modcache / f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"

    caplog.set_level(logging.INFO, logger="kiln.worker.trim")
    running = Running(worker)
    try:
        wait_for("two builds", lambda: all(state(queue, s) in DONE for s in (first, second)),
                 BUILD_SECONDS, 0.2)
        succeeded(queue, first)
        succeeded(queue, second)
        wait_for("the idle worker to trim", lambda: trimmed_log(caplog), 60, 0.1)
        after_two = du(*caches)
        recorder.flush()
        trimmed = trimmed_bytes(pool)
        assert after_two <= LIMIT
        assert set(trimmed) == {"modules", "gobuild", "buildcache"}
        assert sum(trimmed.values()) > after_two  # most of what two builds left went
        # the module only the first build used went (oldest), whole: go has no half of it
        assert not hello_first.exists()
        assert complete_modules(sandbox.modcache)

        third = spec(sandbox, gp.HELLO_VERSIONS[0], arch="arm64")
        queue.enqueue(third.key(), third.to_dict(), max_attempts=1)
        wait_for("the build after the trim", lambda: state(queue, third) in DONE,
                 BUILD_SECONDS, 0.2)
        succeeded(queue, third)
        assert hello_first.is_dir()  # fetched again
    finally:
        running.stop()


def state(queue: QueueManager, s: BuildSpec) -> str:
    build = queue.get(s.key())
    return str(build.state) if build is not None else ""


def succeeded(queue: QueueManager, s: BuildSpec) -> None:
    build = queue.get(s.key())
    assert build is not None
    assert build.state == "succeeded", build.error


def trimmed_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("worker caches trimmed")]


def complete_modules(modcache: Path) -> bool:
    """Tell whether every module tree has its .ziphash (go's mark of a complete one)."""
    trees = [p for p in modcache.rglob("*@*") if p.is_dir() and "cache" not in p.parts]
    for tree in trees:
        path, _, version = str(tree.relative_to(modcache)).rpartition("@")
        if not (modcache / "cache" / "download" / path / "@v" / f"{version}.ziphash").is_file():
            return False
    return True


# a worker running a build never trims -----------------------------------------------------


def go_cache_file(gocache: Path, n: int, *, age: float) -> Path:
    name = f"{n:02x}" + f"{n:x}" * 62
    path = gocache / name[:2] / f"{name[:64]}-d"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"o" * 8192)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_worker_running_a_build_never_trims_and_trims_once_idle(
        kiln: Kiln, tmp_path: Path) -> None:  # noqa: F811
    gocache = tmp_path / "gocache"
    files = [go_cache_file(gocache, n, age=3600.0 * (10 - n)) for n in range(1, 9)]
    trimmer = CacheTrimmer(limit=0, modules=tmp_path / "mod", gocache=gocache)
    # the oldest half has to go
    trimmer.limit = trimmer.measure() - sum(os.lstat(f).st_blocks * 512 for f in files) // 2
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold())
    kiln.start("w1", concurrency=1, trimmer=trimmer, trim_seconds=0.05)

    call = kiln.wait_call(key)
    time.sleep(1.0)  # twenty trims' worth of time
    assert all(f.exists() for f in files), "trimmed while a build ran"

    call.finish()
    kiln.wait_state(key, "succeeded")
    wait_for("the idle worker to trim", lambda: not files[0].exists(), 5.0, 0.02)
    assert [f.exists() for f in files] == [False] * 4 + [True] * 4
    assert trimmer.measure() <= trimmer.limit

