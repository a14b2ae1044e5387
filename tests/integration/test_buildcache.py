"""The fleet build cache with real Go: two workers, each with its own disk, share one store.

Each "worker" is a Builder with its own process sandbox (its own Go caches) and its own
local build cache, and both use one store directory, as two spot instances of a fleet use
one bucket. Go runs its compile steps with the cache program of worker_image/cacheprog as
GOCACHEPROG; the synthetic module proxy serves the modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.buildcache.blobs import BlobStore, DirectoryBlobs
from kiln.buildcache.cache import BuildCache
from kiln.buildcache.program import compile_program
from kiln.config import Config, LocalStorageConfig, StorageConfig
from kiln.janitor.buildcache_gc import BuildCacheCollector
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.wiring import make_buildcache_store, make_janitor
from kiln.worker.builder import Builder, BuildFailure
from kiln.worker.sandbox.process import find_go
from tests.fixtures import goproxy as gp
from tests.integration.test_store_contract import s3_client, s3_config
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cacheprog(go_cache_dir: Path) -> Path:
    """Return the cache program, compiled once (kept between runs, named by its source)."""
    return compile_program(go=find_go(), into=go_cache_dir / "cacheprog")


@pytest.fixture
def sockets() -> Iterator[Path]:
    # a Unix socket's path is short; pytest's tmp_path may not be
    with tempfile.TemporaryDirectory(prefix="kiln-bc-") as tmp:
        yield Path(tmp)


@dataclass
class Fleet:
    root: Path
    proxy: Path
    program: Path
    sockets: Path

    @property
    def store(self) -> DirectoryBlobs:
        return DirectoryBlobs(self.root / "store" / "buildcache")

    def worker(self, name: str, *, store: DirectoryBlobs | None = None) -> tuple[Builder,
                                                                                  BuildCache]:
        """Return a fresh worker: empty Go caches, an empty local build cache."""
        sandbox = process_sandbox(self.root / name / "go")
        cache = BuildCache(directory=self.root / name / "buildcache",
                           store=store if store is not None else self.store,
                           program=self.program, socket_dir=self.sockets / name)
        builder = Builder(sandbox=sandbox, goproxy=f"file://{self.proxy}", gosumdb="off",
                          fetch_timeout=FETCH_TIMEOUT_SECONDS,
                          compile_timeout=COMPILE_TIMEOUT_SECONDS, buildcache=cache)
        return builder, cache


@pytest.fixture
def fleet(tmp_path: Path, proxy_dir: Path, cacheprog: Path, sockets: Path) -> Fleet:
    return Fleet(tmp_path, proxy_dir, cacheprog, sockets)


def spec_for(builder: Builder, plugin: str = gp.HELLO,
             version: str = gp.HELLO_VERSIONS[0]) -> BuildSpec:
    sandbox = builder.sandbox
    return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=plugin, module=plugin, version=version),),
                     replacements=(), go_version=sandbox.go_version(),
                     sandbox=sandbox.identity)


def build(builder: Builder, spec: BuildSpec, workdir: Path, *, publish: bool = True) -> bytes:
    """Build ``spec`` as the worker does; share the cache entries if it succeeded."""
    out = builder.build(spec, key=spec.key(), workdir=workdir, log=lambda _s, _l: None)
    assert out.cache is not None
    if publish:
        out.cache.publish()
    else:
        out.cache.discard()
    return out.binary.read_bytes()


def stored(fleet: Fleet) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"a": [], "o": []}
    for blob in fleet.store.blobs():
        kinds.setdefault(blob.path[0], []).append(blob.path)
    return kinds


def test_a_fresh_worker_reuses_what_the_fleet_compiled(fleet: Fleet) -> None:
    a, a_cache = fleet.worker("a")
    spec = spec_for(a)
    first = build(a, spec, fleet.root / "work-a")
    # worker a compiled everything (its disk was empty, as was the store), and shared it
    assert a_cache.stats["puts"] > 50, a_cache.stats
    assert a_cache.stats["store"] == 0
    shared = stored(fleet)
    assert len(shared["a"]) == a_cache.stats["puts"]
    assert shared["o"]

    # worker b starts empty; the artifact was forgotten, so it builds the same spec again
    b, b_cache = fleet.worker("b")
    again = build(b, spec, fleet.root / "work-b")
    assert again == first
    # b found in the store what a compiled, and compiled next to nothing itself (a put
    # 274 outputs here, b a handful): fetched ahead from a's manifest of the build, or
    # when go asked
    assert shared["m"] == [f"m/{spec.key()}"]
    from_store = b_cache.stats["store"] + b_cache.stats["prefetched"]
    assert b_cache.stats["prefetched"] > 0, b_cache.stats
    assert b_cache.stats["miss"] * 10 < from_store, b_cache.stats
    assert b_cache.stats["puts"] * 10 < a_cache.stats["puts"], b_cache.stats
    assert b_cache.stats["rejected"] == 0

    # and what b now has on its disk serves its next build without the store
    b_cache.store = None
    build(b, spec, fleet.root / "work-b2")
    assert b_cache.stats["local"] >= from_store, b_cache.stats


def test_a_failed_build_shares_nothing(fleet: Fleet) -> None:
    a, a_cache = fleet.worker("a")
    spec = spec_for(a, gp.BROKEN, gp.BROKEN_VERSION)
    with pytest.raises(BuildFailure) as failure:
        a.build(spec, key=spec.key(), workdir=fleet.root / "work", log=lambda _s, _l: None)
    assert gp.BROKEN_ERROR in failure.value.message
    assert a_cache.stats["puts"] > 0  # it did compile (and cache locally) the other packages
    assert stored(fleet) == {"a": [], "o": []}


def test_a_build_whose_upload_fails_shares_nothing(fleet: Fleet) -> None:
    a, a_cache = fleet.worker("a")
    build(a, spec_for(a), fleet.root / "work", publish=False)
    assert a_cache.stats["puts"] > 0
    assert stored(fleet) == {"a": [], "o": []}


def test_a_corrupted_or_truncated_stored_entry_is_ignored(fleet: Fleet) -> None:
    a, _ = fleet.worker("a")
    spec = spec_for(a)
    first = build(a, spec, fleet.root / "work-a")
    outputs = sorted((fleet.store.root / "o").iterdir(), key=lambda p: p.stat().st_size)
    flipped, cut = outputs[-1], outputs[-2]  # the largest: package archives
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])

    b, b_cache = fleet.worker("b")
    again = build(b, spec, fleet.root / "work-b", publish=False)
    assert again == first  # the right binary: go compiled those two packages again
    assert b_cache.stats["rejected"] == 2, b_cache.stats
    assert b_cache.stats["puts"] >= 2
    # neither bad copy reached b's disk under its output id
    for bad in (flipped, cut):
        local = b_cache.outputs / bad.name
        assert not local.exists() or local.read_bytes() != bad.read_bytes()


def test_a_build_succeeds_when_the_store_is_unavailable(fleet: Fleet) -> None:
    blocked = fleet.root / "not-a-directory"
    blocked.write_text("a file where the store's directory should be\n")
    b, b_cache = fleet.worker("b", store=DirectoryBlobs(blocked / "buildcache"))
    spec = spec_for(b)
    out = b.build(spec, key=spec.key(), workdir=fleet.root / "work", log=lambda _s, _l: None)
    assert out.binary.is_file()
    assert out.cache is not None
    assert out.cache.publish() == 0
    assert b_cache.stats["store_errors"] >= 1
    assert b_cache.stats["puts"] > 0  # built with the local cache alone


def test_a_build_succeeds_when_the_worker_stops_answering(fleet: Fleet) -> None:
    """The cache program treats a socket that is gone as an empty cache."""
    a, a_cache = fleet.worker("a")
    spec = spec_for(a)
    a.fetch(spec, key=spec.key(), workdir=fleet.root / "work", log=lambda _s, _l: None)
    original = a_cache.begin

    def begin_and_hang_up(key: str):  # type: ignore[no-untyped-def]
        session = original(key)
        session.stop()  # the socket is removed before go starts
        return session

    a_cache.begin = begin_and_hang_up  # type: ignore[method-assign]
    out = a.compile(spec, key=spec.key(), workdir=fleet.root / "work", log=lambda _s, _l: None)
    assert out.binary.is_file()
    assert a_cache.stats["puts"] == 0
    assert not os.listdir(fleet.sockets / "a")


# what the socket refuses, and what the janitor collects ---------------------------------


def ask(path: Path, line: bytes, body: bytes = b"") -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(line + b"\n" + body)
        reply = conn.makefile("rb").readline()
    return dict(json.loads(reply))


def test_the_socket_refuses_what_is_not_a_cache_request(tmp_path: Path,
                                                        sockets: Path) -> None:
    cache = BuildCache(directory=tmp_path / "local", store=DirectoryBlobs(tmp_path / "store"),
                       program=Path("/nonexistent"), socket_dir=sockets)
    session = cache.begin("key")
    body = b"an object file\n"
    good = hashlib.sha256(body).hexdigest()
    action = "ab" * 32
    try:
        assert "JSON" in ask(session.socket, b"not json")["Err"]
        assert "unknown command" in ask(session.socket, b'{"Command":"rm"}')["Err"]
        wrong = json.dumps({"Command": "put", "ActionID": action, "OutputID": "cd" * 32,
                            "Size": len(body)}).encode()
        assert "does not hash" in ask(session.socket, wrong, body)["Err"]
        huge = json.dumps({"Command": "put", "ActionID": action, "OutputID": good,
                           "Size": 1 << 40}).encode()
        assert "at most" in ask(session.socket, huge)["Err"]
        bad_id = json.dumps({"Command": "put", "ActionID": "../../etc/passwd",
                             "OutputID": good, "Size": len(body)}).encode()
        assert "hex" in ask(session.socket, bad_id, body)["Err"]
        assert ask(session.socket, json.dumps({"Command": "get", "ActionID": action})
                   .encode()) == {"Miss": True}
        # a put the worker accepts is served back, and staged for this build only
        put = json.dumps({"Command": "put", "ActionID": action, "OutputID": good,
                          "Size": len(body)}).encode()
        assert ask(session.socket, put, body) == {"Name": good}
        got = ask(session.socket, json.dumps({"Command": "get", "ActionID": action}).encode())
        assert got == {"OutputID": good, "Size": len(body), "Name": good}
        assert (cache.outputs / good).read_bytes() == body
    finally:
        session.stop()
    assert list(session.staged) == [action]
    assert not session.socket.exists()


def test_the_janitor_collects_the_store_by_age_then_size(tmp_path: Path) -> None:
    store = DirectoryBlobs(tmp_path / "buildcache")
    now = 1_000_000.0
    ages = {"o/old": 40 * 86400, "o/mid": 3000, "a/mid": 3000, "o/new": 10, "a/new": 10}
    for path, age in ages.items():
        store.write(path, b"x" * 100)
        os.utime(store.root / path, (now - age, now - age))
    collector = BuildCacheCollector(store=store, max_bytes=250, max_age=30 * 86400,
                                    clock=lambda: now)
    report = collector.collect()
    assert (report.expired, report.over_budget) == (1, 2)
    assert sorted(b.path for b in store.blobs()) == ["a/new", "o/new"]
    assert report.kept_bytes == 200


def test_a_put_cut_short_leaves_nothing(tmp_path: Path, sockets: Path) -> None:
    """A step killed while it sends an output: no entry, no output, nothing staged."""
    cache = BuildCache(directory=tmp_path / "local", store=None, program=Path("/nonexistent"),
                       socket_dir=sockets)
    session = cache.begin("key")
    body = b"x" * 1000
    put = json.dumps({"Command": "put", "ActionID": "ab" * 32,
                      "OutputID": hashlib.sha256(body).hexdigest(), "Size": len(body)})
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(session.socket))
            conn.sendall(put.encode() + b"\n" + body[:100])
            conn.shutdown(socket.SHUT_WR)
            assert "early" in json.loads(conn.makefile("rb").readline())["Err"]
    finally:
        session.stop()
    assert not session.staged
    assert not list(cache.outputs.iterdir()) and not list(cache.actions.iterdir())
    assert not list((cache.directory / "tmp").iterdir())


@pytest.fixture(params=["directory", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "directory":
        return make_buildcache_store(StorageConfig(local=LocalStorageConfig(path=tmp_path)))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return make_buildcache_store(s3_config(endpoint, bucket, prefix="artifacts"))


def test_both_stores_keep_the_cache_beside_the_artifacts(blobs: BlobStore,
                                                         tmp_path: Path) -> None:
    assert blobs.read("a/" + "0" * 64) is None
    assert not blobs.download("o/" + "0" * 64, tmp_path / "none")
    assert not blobs.exists("o/x")
    source = tmp_path / "object"
    source.write_bytes(b"compiled\n" * 1000)
    blobs.upload("o/x", source)
    blobs.write("a/y", b'{"output": "x"}')
    assert blobs.exists("o/x")
    assert blobs.read("a/y") == b'{"output": "x"}'
    assert blobs.download("o/x", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert sorted((b.path, b.size) for b in blobs.blobs()) == [("a/y", 15), ("o/x", 9000)]
    blobs.delete("o/x")
    blobs.delete("o/x")  # gone already: nothing to do
    assert [b.path for b in blobs.blobs()] == ["a/y"]


def test_the_janitor_runs_the_collection_only_when_the_cache_is_on(db_url: str,
                                                                   tmp_path: Path) -> None:
    settings = {"database": {"url": db_url},
                "storage": {"local": {"path": str(tmp_path / "artifacts")}}}
    off = make_janitor(Config.model_validate(settings), url=db_url)
    try:
        assert "buildcache_gc" not in [job.name for job in off.jobs]
    finally:
        off.queue.pool.close()
    store = make_buildcache_store(StorageConfig(local=LocalStorageConfig(
        path=tmp_path / "artifacts")))
    assert isinstance(store, DirectoryBlobs)
    store.write("o/old", b"x")
    os.utime(store.root / "o" / "old", (1.0, 1.0))  # 1970: past any max_age
    store.write("o/new", b"y")
    janitor = make_janitor(Config.model_validate(
        {**settings, "buildcache": {"enabled": True, "max_age": 86400}}), url=db_url)
    try:
        assert janitor.run_once(only=["buildcache_gc"]) == {"buildcache_gc": "done"}
    finally:
        janitor.queue.pool.close()
    assert [b.path for b in store.blobs()] == ["o/new"]
