"""Module sets with real Go: a worker that built a spec shares its go.mod, go.sum and
modules; another worker with empty Go caches builds the same spec without a fetch step.

Each "worker" is a Builder with its own process sandbox (its own module cache); both use
one store directory. The second worker's module proxy is unreachable: a fetch step would
fail, so a build that succeeds proves the set alone fed it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.artifacts.local import LocalStore
from kiln.artifacts.store import ArtifactStore
from kiln.modproxy.modsets import SETS, STAGING, ModuleSets, modules_of
from kiln.modproxy.store import PREFIX, ModuleStore, objects_of
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from tests.fixtures import goproxy as gp
from tests.integration.test_store_contract import s3_client, s3_config
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox

pytestmark = pytest.mark.slow

#: nothing listens there: a fetch step that asks it fails
DEAD_PROXY = "http://127.0.0.1:9"


class Counts:
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def inc(self, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        key = f"{name}:{labels.get('result', '')}"
        self.seen[key] = self.seen.get(key, 0) + amount

    def __getitem__(self, result: str) -> float:
        return self.seen.get(f"kiln_modcache_sets_total:{result}", 0)


@dataclass
class Worker:
    builder: Builder
    sets: ModuleSets
    counts: Counts
    lines: list[str]

    def build(self, spec: BuildSpec, workdir: Path, *, share: bool = True) -> bytes:
        self.lines.clear()
        out = self.builder.build(spec, key=spec.key(), workdir=workdir,
                                 log=lambda _step, line: self.lines.append(line))
        if share:
            out.share()
        return out.binary.read_bytes()

    @property
    def skipped_fetch(self) -> bool:
        return any("fetch steps skipped" in line for line in self.lines)


@dataclass
class Fleet:
    root: Path
    proxy: Path
    artifacts: ArtifactStore | None = None

    @property
    def store(self) -> ModuleStore:
        return ModuleStore(objects_of(self.artifacts or LocalStore(self.root / "store")))

    def worker(self, name: str, *, goproxy: str | None = None) -> Worker:
        sandbox = process_sandbox(self.root / name / "go")
        counts = Counts()
        sets = ModuleSets(self.store, modcache=sandbox.modcache, counters=counts)
        builder = Builder(sandbox=sandbox, goproxy=goproxy or f"file://{self.proxy}",
                          gosumdb="off", fetch_timeout=FETCH_TIMEOUT_SECONDS,
                          compile_timeout=COMPILE_TIMEOUT_SECONDS, modsets=sets)
        return Worker(builder, sets, counts, [])

    def set_files(self) -> dict[str, Path]:
        base = self.root / "store" / PREFIX / SETS
        return {p.name: p for p in base.iterdir()} if base.is_dir() else {}


@pytest.fixture
def fleet(tmp_path: Path, proxy_dir: Path) -> Fleet:
    return Fleet(tmp_path, proxy_dir)


def spec_for(builder: Builder, version: str = gp.HELLO_VERSIONS[0]) -> BuildSpec:
    sandbox = builder.sandbox
    return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO,
                                             version=version),),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)


def test_a_fresh_worker_builds_a_known_spec_without_fetching(fleet: Fleet) -> None:
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    first = a.build(spec, fleet.root / "work-a")
    assert not a.skipped_fetch
    assert a.counts["miss"] == 1 and a.counts["published"] == 1
    key = a.builder.module_set(spec)
    assert {f"{key}.json", f"{key}.json.meta", f"{key}.tar", f"{key}.tar.meta"} <= set(
        fleet.set_files())

    # a fresh worker whose module proxy does not answer: only the set can feed it
    b = fleet.worker("b", goproxy=DEAD_PROXY)
    second = b.build(spec, fleet.root / "work-b")
    assert b.skipped_fetch, b.lines
    assert b.counts["restored"] == 1 and b.counts["published"] == 0
    # the same binary, byte for byte: the same go.mod, go.sum and module sources
    assert hashlib.sha256(second).digest() == hashlib.sha256(first).digest()
    record = json.loads((fleet.set_files()[f"{key}.json"]).read_bytes())
    for m in modules_of(record["go_sum"]):
        if m.full:
            assert (b.sets.modcache / m.tree).is_dir()
            assert (b.sets.modcache / m.download(".ziphash")).is_file()
    assert not any((b.sets.modcache / STAGING).iterdir())

    # built again on the same worker, its own module cache is enough: the tar is not read
    (fleet.set_files()[f"{key}.tar"]).unlink()
    b.build(spec, fleet.root / "work-b2")
    assert b.skipped_fetch and b.counts["local"] == 1


def test_another_plugin_version_is_another_set(fleet: Fleet) -> None:
    a = fleet.worker("a")
    a.build(spec_for(a.builder), fleet.root / "work-a")
    b = fleet.worker("b")
    b.build(spec_for(b.builder, gp.HELLO_VERSIONS[1]), fleet.root / "work-b")
    assert not b.skipped_fetch and b.counts["miss"] == 1
    assert len([n for n in fleet.set_files() if n.endswith(".json")]) == 2

    # b has Caddy's modules now: of a's set it unpacks only the plugin version it lacks
    b.build(spec_for(b.builder), fleet.root / "work-b2")
    assert b.skipped_fetch and b.counts["restored"] == 1
    restored = [line for line in b.lines if "module set" in line][-1]
    assert "1 of them unpacked" in restored, restored
    # as go leaves a module's tree: read-only, as on the worker that fetched it
    tree = f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"
    assert (b.sets.modcache / tree).stat().st_mode == (a.sets.modcache / tree).stat().st_mode
    assert (b.sets.modcache / tree).stat().st_mode & 0o222 == 0


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_set_is_deleted_and_the_build_fetches(fleet: Fleet, damage: str) -> None:
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    first = a.build(spec, fleet.root / "work-a")
    key = a.builder.module_set(spec)
    tar = fleet.set_files()[f"{key}.tar"]
    data = bytearray(tar.read_bytes())
    if damage == "flipped":
        # a byte of a module's source, far from the tar's headers
        where = data.index(b"package ")
        data[where + 3] ^= 0x01
    else:
        del data[len(data) // 2:]
    os.chmod(tar, 0o644)
    tar.write_bytes(bytes(data))

    b = fleet.worker("b")
    second = b.build(spec, fleet.root / "work-b", share=False)
    assert not b.skipped_fetch, b.lines
    assert b.counts["corrupt"] == 1
    # the damaged set is gone, and nothing of it reached the module cache
    assert f"{key}.tar" not in fleet.set_files() and f"{key}.tar.meta" not in fleet.set_files()
    assert not any((b.sets.modcache / STAGING).iterdir())
    assert second == first


def test_a_killed_restore_leaves_nothing_go_would_use(fleet: Fleet) -> None:
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    a.build(spec, fleet.root / "work-a")
    key = a.builder.module_set(spec)

    # a worker killed while it unpacked: a staged tree, and a module moved in without its
    # .ziphash (go's mark of a complete module)
    b = fleet.worker("b", goproxy=DEAD_PROXY)
    modules = [m for m in modules_of(json.loads(
        fleet.set_files()[f"{key}.json"].read_bytes())["go_sum"]) if m.full]
    half = b.sets.modcache / modules[0].tree
    half.mkdir(parents=True)
    (half / "go.mod").write_text("module half\n")
    staged = b.sets.modcache / STAGING / "dead" / "x"
    staged.mkdir(parents=True)
    os.chmod(staged.parent, 0o555)

    restarted = ModuleSets(fleet.store, modcache=b.sets.modcache, counters=b.counts)
    assert not (b.sets.modcache / STAGING / "dead").exists()
    # the half-moved module is not taken for complete: the set is not used, go fetches
    assert restarted.restore(key) is None
    assert not (b.sets.modcache / modules[0].download(".ziphash")).exists()


def test_sets_travel_through_an_s3_bucket(tmp_path: Path, proxy_dir: Path,
                                          s3_endpoint: str) -> None:
    from kiln.wiring import make_s3_store

    bucket = "kiln-sets"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    fleet = Fleet(tmp_path, proxy_dir, make_s3_store(s3_config(s3_endpoint, bucket)))
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    first = a.build(spec, tmp_path / "work-a")
    key = a.builder.module_set(spec)
    names = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(
        Bucket=bucket, Prefix=f"{PREFIX}{SETS}")["Contents"]}
    assert f"{PREFIX}{SETS}{key}.tar" in names and f"{PREFIX}{SETS}{key}.json.meta" in names

    b = fleet.worker("b", goproxy=DEAD_PROXY)
    assert b.build(spec, tmp_path / "work-b") == first
    assert b.skipped_fetch and b.counts["restored"] == 1


def test_a_build_goes_on_when_the_store_is_unavailable(tmp_path: Path, proxy_dir: Path) -> None:
    store = LocalStore(tmp_path / "store")
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "store").write_text("a file where the store's directory should be\n")
    fleet = Fleet(tmp_path, proxy_dir, store)
    a = fleet.worker("a")
    binary = a.build(spec_for(a.builder), tmp_path / "work-a")
    assert binary and not a.skipped_fetch
    # neither the look-up nor the publication could reach the store; the build did not care
    assert a.counts["error"] == 2 and a.counts["published"] == 0


def test_a_restore_waits_for_the_lock_go_takes_on_a_module(fleet: Fleet) -> None:
    """A fetch step unpacking a module holds go's lock on it: the set's copy waits."""
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    a.build(spec, fleet.root / "work-a")
    key = a.builder.module_set(spec)
    b = fleet.worker("b")
    hello = next(m for m in modules_of(json.loads(
        fleet.set_files()[f"{key}.json"].read_bytes())["go_sum"]) if m.path == gp.HELLO)
    lock = b.sets.modcache / hello.download(".lock")
    lock.parent.mkdir(parents=True)
    results: list[object] = []
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as go's lockedfile does
        worker = threading.Thread(target=lambda: results.append(b.sets.restore(key)))
        worker.start()
        time.sleep(2)
        # everything else is in; this module waits for the lock
        assert not (b.sets.modcache / hello.tree).exists()
        assert not results
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert results and results[0] is not None
    assert (b.sets.modcache / hello.download(".ziphash")).is_file()


def test_a_set_whose_tar_was_collected_is_shared_again(fleet: Fleet) -> None:
    a = fleet.worker("a")
    spec = spec_for(a.builder)
    a.build(spec, fleet.root / "work-a")
    key = a.builder.module_set(spec)
    for name in (f"{key}.tar.meta", f"{key}.tar"):  # as the janitor's collection deletes
        fleet.set_files()[name].unlink()

    b = fleet.worker("b")
    b.build(spec, fleet.root / "work-b")
    assert not b.skipped_fetch and b.counts["miss"] == 1 and b.counts["published"] == 1
    assert {f"{key}.tar", f"{key}.tar.meta"} <= set(fleet.set_files())
    c = fleet.worker("c", goproxy=DEAD_PROXY)
    c.build(spec, fleet.root / "work-c")
    assert c.skipped_fetch and c.counts["restored"] == 1
