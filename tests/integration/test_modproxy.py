"""The fleet module cache: a Go module proxy over the shared store, with real Go builds.

Each "worker" here is what a worker runs: a ModuleCache behind its ModuleProxyServer on
127.0.0.1, and a process sandbox with its own (empty) Go caches whose fetch steps use that
server as GOPROXY. Upstream is the synthetic module proxy behind a small counting HTTP front,
which can also answer as a checksum database signed with a key made for the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kiln.artifacts.local import LocalStore
from kiln.modproxy.cache import BYTES, REQUESTS, ModuleCache, SumDB
from kiln.modproxy.checksum import Verifier, hash_go_mod, hash_zip
from kiln.modproxy.server import ModuleProxyServer
from kiln.modproxy.store import DirectoryObjects, ModuleStore, objects_of
from kiln.modproxy.upstream import Upstream
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder, BuildFailure
from tests.fixtures import goproxy as gp
from tests.fixtures.goproxy.paths import escape_path, unescape_path
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox

pytestmark = pytest.mark.slow

SUMDB_NAME = "sum.kiln.test"


class FakeSumDB:
    """A checksum database for the synthetic modules: lookups signed with a test key.

    It signs a one-record tree: enough for the signature and record checks the cache makes;
    ``tamper`` names versions whose zip hash it misreports.
    """

    def __init__(self, proxy_dir: Path) -> None:
        self.proxy_dir = proxy_dir
        self.key = Ed25519PrivateKey.generate()
        raw = b"\x01" + self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_hash = hashlib.sha256(SUMDB_NAME.encode() + b"\n" + raw).digest()[:4]
        self.verifier_key = f"{SUMDB_NAME}+{self.key_hash.hex()}+{base64.b64encode(raw).decode()}"
        self.tamper: set[tuple[str, str]] = set()

    def lookup(self, what: str) -> bytes | None:
        escaped_module, _, escaped_version = what.rpartition("@")
        base = self.proxy_dir / escaped_module / "@v"
        zip_file, mod_file = base / f"{escaped_version}.zip", base / f"{escaped_version}.mod"
        if not zip_file.exists():
            return None
        module, version = unescape_path(escaped_module), unescape_path(escaped_version)
        zip_sum = hash_zip(zip_file)
        if (module, version) in self.tamper:
            zip_sum = "h1:" + base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
        record = (f"1\n{module} {version} {zip_sum}\n"
                  f"{module} {version}/go.mod {hash_go_mod(mod_file.read_bytes())}\n")
        tree = f"go.sum database tree\n1\n{base64.b64encode(bytes(32)).decode()}\n"
        signature = base64.b64encode(self.key_hash + self.key.sign(tree.encode())).decode()
        return f"{record}\n{tree}\n\u2014 {SUMDB_NAME} {signature}\n".encode()


@dataclass
class Front:
    """A counting HTTP front of the synthetic proxy (and of a FakeSumDB, when given one)."""

    upstream: str
    sumdb: FakeSumDB | None = None
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def modules_asked(self) -> Counter[str]:
        with self.lock:
            return Counter({k: v for k, v in self.counts.items() if not k.startswith("sumdb/")})


def front_handler(front: Front) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            rel = self.path.lstrip("/")
            with front.lock:
                front.counts[rel] += 1
            prefix = f"sumdb/{SUMDB_NAME}/lookup/"
            if front.sumdb is not None and rel.startswith(prefix):
                data = front.sumdb.lookup(rel[len(prefix):])
                self._reply(404 if data is None else 200, data or b"not found\n")
                return
            try:
                with urllib.request.urlopen(f"{front.upstream}/{rel}", timeout=30) as answer:
                    self._reply(answer.status, answer.read())
            except urllib.error.HTTPError as exc:
                self._reply(exc.code, exc.read())

        def _reply(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
            pass

    return Handler


@pytest.fixture
def front(proxy_server: gp.ProxyServer) -> Iterator[Front]:
    """Serve a counting front of the synthetic proxy on 127.0.0.1."""
    made = Front(upstream=proxy_server.url)
    server = ThreadingHTTPServer(("127.0.0.1", 0), front_handler(made))
    made.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        server.shutdown()
        server.server_close()


class Counts:
    """The counters a cache records (kiln.metrics.MetricsRecorder's inc)."""

    def __init__(self) -> None:
        self.values: Counter[tuple[str, str]] = Counter()

    def inc(self, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        self.values[(name, json.dumps(labels, sort_keys=True))] += amount

    def requests(self, result: str) -> float:
        return self.values[(REQUESTS, json.dumps({"result": result}))]

    def bytes_from(self, source: str) -> float:
        return self.values[(BYTES, json.dumps({"source": source}))]


@dataclass
class Worker:
    """One worker's share of the fleet: its module proxy and a sandbox with empty caches."""

    server: ModuleProxyServer
    builder: Builder
    counts: Counts
    cache_dir: Path


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for worker in made:
        worker.server.close()


def start_worker(workers: list[Worker], tmp_path: Path, front: Front, store: ModuleStore, *,
                 verifier: Verifier | None = None) -> Worker:
    upstream = Upstream(front.url, timeout=30)
    counts = Counts()
    cache = ModuleCache(store=store, upstream=upstream, metrics=counts,
                        checksums=SumDB(upstream, verifier) if verifier else None)
    server = ModuleProxyServer(cache).start()
    cache_dir = tmp_path / f"worker{len(workers)}"
    sandbox = process_sandbox(cache_dir)
    builder = Builder(sandbox=sandbox, goproxy=server.url, gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS, compile_timeout=COMPILE_TIMEOUT_SECONDS)
    worker = Worker(server=server, builder=builder, counts=counts, cache_dir=cache_dir)
    workers.append(worker)
    return worker


def spec_for(worker: Worker, hello: str = gp.HELLO_VERSIONS[0]) -> BuildSpec:
    sandbox = worker.builder.sandbox
    return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO, version=hello),),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)


def build(worker: Worker, workdir: Path, hello: str = gp.HELLO_VERSIONS[0]) -> tuple[bytes, str]:
    spec = spec_for(worker, hello)
    out = worker.builder.build(spec, key=spec.key(), workdir=workdir, log=lambda _s, _l: None)
    return out.binary.read_bytes(), out.go_sum


def hello_zip(version: str = gp.HELLO_VERSIONS[0]) -> str:
    return f"{escape_path(gp.HELLO)}/@v/{version}.zip"


def test_a_fresh_worker_builds_from_what_the_fleet_fetched(
        front: Front, workers: list[Worker], tmp_path: Path) -> None:
    store = ModuleStore(objects_of(LocalStore(tmp_path / "store")))
    first = start_worker(workers, tmp_path, front, store)
    binary, go_sum = build(first, tmp_path / "first")
    fetched = front.modules_asked()
    assert fetched[hello_zip()] == 1, fetched
    assert first.counts.requests("miss") > 0 and first.counts.bytes_from("upstream") > 0
    assert (tmp_path / "store" / "modcache" / hello_zip()).is_file()

    # another worker, with empty Go caches, sharing only the store
    front.counts.clear()
    second = start_worker(workers, tmp_path, front, store)
    again, again_sum = build(second, tmp_path / "second")
    assert front.modules_asked() == Counter(), "a fresh worker asked upstream for modules"
    assert again == binary and again_sum == go_sum
    assert second.counts.requests("hit") > 0 and second.counts.bytes_from("store") > 0
    assert second.counts.requests("miss") == 0


def test_a_corrupt_entry_is_discarded_and_fetched_again(
        front: Front, workers: list[Worker], tmp_path: Path) -> None:
    store = ModuleStore(objects_of(LocalStore(tmp_path / "store")))
    first = start_worker(workers, tmp_path, front, store)
    binary, _ = build(first, tmp_path / "first")
    stored = tmp_path / "store" / "modcache" / hello_zip()
    good = stored.read_bytes()
    # same size, other bytes: only the hash can tell
    stored.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))

    front.counts.clear()
    second = start_worker(workers, tmp_path, front, store)
    again, _ = build(second, tmp_path / "second")
    assert again == binary
    assert second.counts.requests("corrupt") == 1
    assert front.modules_asked()[hello_zip()] == 1
    assert stored.read_bytes() == good  # stored again, as upstream has it

    # truncated: the size tells
    stored.write_bytes(good[: len(good) // 2])
    front.counts.clear()
    third = start_worker(workers, tmp_path, front, store)
    assert build(third, tmp_path / "third")[0] == binary
    assert third.counts.requests("corrupt") == 1
    assert front.modules_asked()[hello_zip()] == 1


def test_an_unavailable_store_still_builds_from_upstream(
        front: Front, workers: list[Worker], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be\n")
    store = ModuleStore(DirectoryObjects(blocker / "store"))
    worker = start_worker(workers, tmp_path, front, store)
    binary, _ = build(worker, tmp_path / "build")
    assert binary
    assert worker.counts.requests("bypass") > 0
    assert worker.counts.requests("hit") == worker.counts.requests("miss") == 0
    assert front.modules_asked()[hello_zip()] == 1


def test_the_checksum_database_is_checked_before_anything_is_stored(
        front: Front, workers: list[Worker], tmp_path: Path, proxy_dir: Path) -> None:
    sumdb = FakeSumDB(proxy_dir)
    front.sumdb = sumdb
    verifier = Verifier.parse(sumdb.verifier_key)
    store = ModuleStore(objects_of(LocalStore(tmp_path / "store")))
    worker = start_worker(workers, tmp_path, front, store, verifier=verifier)
    _, go_sum = build(worker, tmp_path / "good")
    # the go command's own hashes agree with the ones the cache checked
    zip_line = f"{gp.HELLO} {gp.HELLO_VERSIONS[0]} {hash_zip(proxy_dir / hello_zip())}"
    assert zip_line in go_sum.splitlines()
    assert worker.counts.requests("refused") == worker.counts.requests("bypass") == 0
    assert (tmp_path / "store" / "modcache" / hello_zip()).is_file()
    assert front.counts[f"sumdb/{SUMDB_NAME}/lookup/{escape_path(gp.HELLO)}@"
                        f"{gp.HELLO_VERSIONS[0]}"] == 1  # asked once for its .mod and .zip

    # the database reports another hash for the other version's zip: refused, not stored
    sumdb.tamper.add((gp.HELLO, gp.HELLO_VERSIONS[1]))
    fresh = start_worker(workers, tmp_path, front, store, verifier=verifier)
    with pytest.raises(BuildFailure) as failed:
        build(fresh, tmp_path / "bad", gp.HELLO_VERSIONS[1])
    message = failed.value.message
    assert f"verifying {gp.HELLO}@{gp.HELLO_VERSIONS[1]}: checksum mismatch" in message
    assert "SECURITY ERROR" in message
    assert not failed.value.retryable
    assert fresh.counts.requests("refused") == 1
    assert not (tmp_path / "store" / "modcache" / hello_zip(gp.HELLO_VERSIONS[1])).exists()

    # a note signed by another key is not believed: served unstored, never trusted
    other = FakeSumDB(proxy_dir)
    third = start_worker(workers, tmp_path, front, store,
                         verifier=Verifier.parse(other.verifier_key))
    proxy = f"{third.server.url}/{escape_path(gp.UTIL)}/@v/{gp.UTIL_VERSION}.zip"
    with urllib.request.urlopen(proxy, timeout=30) as answer:
        assert answer.status == 200
    assert third.counts.requests("bypass") == 1
    assert not (tmp_path / "store" / "modcache" / escape_path(gp.UTIL) / "@v"
                / f"{gp.UTIL_VERSION}.zip").exists()


def test_bad_paths_get_a_json_400_saying_what_is_served(
        front: Front, workers: list[Worker], tmp_path: Path) -> None:
    store = ModuleStore(objects_of(LocalStore(tmp_path / "store")))
    worker = start_worker(workers, tmp_path, front, store)
    for path in ("/github.com/Kiln/x/@v/list", "/../etc/passwd", "/github.com/x/y/@v/latest.zip",
                 "/nothing-here"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(worker.server.url + path, timeout=10)
        assert refused.value.code == 400, path
        body = json.loads(refused.value.read())
        assert body["status_code"] == 400 and body["error"]["message"], path
    request = urllib.request.Request(worker.server.url + "/" + hello_zip(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    assert front.modules_asked() == Counter()


def test_a_writer_killed_midway_leaves_nothing_visible_and_the_janitor_collects(
        front: Front, workers: list[Worker], tmp_path: Path) -> None:
    objects = DirectoryObjects(tmp_path / "store")
    now = [time.time() - 4 * 86400]
    store = ModuleStore(objects, clock=lambda: now[0])
    worker = start_worker(workers, tmp_path, front, store)
    url = f"{worker.server.url}/{hello_zip()}"
    # a writer killed after publishing the file, before its sidecar: a miss, fetched again
    objects.publish("modcache/" + hello_zip(), _bytes(b"half of a zip"))
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.read() == (front_file(front, hello_zip()))
    assert worker.counts.requests("miss") == 1
    # killed while writing the temporary copy: nothing under modcache/ names it
    (tmp_path / "store" / ".tmp" / "modcache.deadbeef").write_bytes(b"partial")
    assert store.get("nothing/@v/v1.0.0.zip") is None

    from kiln.janitor.modcache_gc import ModuleCacheCollector

    # three entries stored a day apart, and a leftover file without its sidecar
    paths = [f"example.com/m{i}/@v/v1.0.0.mod" for i in range(3)]
    for path in paths:
        now[0] += 86400
        store.put(path, _bytes(b"module example.com/m\n" * 10))
    leftover = tmp_path / "store" / "modcache" / "example.com" / "gone" / "@v" / "v1.0.0.zip"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"no sidecar")
    young = leftover.with_name("v1.0.1.zip")
    young.write_bytes(b"no sidecar yet: maybe still being written")
    collected_at = now[0] + 2 * 3600
    os.utime(leftover, (collected_at - 2 * 3600, collected_at - 2 * 3600))
    os.utime(young, (collected_at - 60, collected_at - 60))
    size = len(b"module example.com/m\n" * 10)
    collector = ModuleCacheCollector(store=store, max_bytes=2 * size, max_age=2.5 * 86400,
                                     clock=lambda: collected_at)
    done = collector.collect()
    # the hello zip is 3 days old: past max_age; then m0, the oldest, for the size budget
    assert done["deleted"] == 2 and done["leftovers"] == 1, done
    assert store.get(hello_zip()) is None and store.get(paths[0]) is None
    assert store.get(paths[1]) is not None and store.get(paths[2]) is not None
    assert not leftover.exists() and young.exists()
    assert not (tmp_path / "store" / "modcache" / (hello_zip() + ".meta")).exists()


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def front_file(front: Front, rel: str) -> bytes:
    with urllib.request.urlopen(f"{front.upstream}/{rel}", timeout=30) as answer:
        return bytes(answer.read())


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_both_stores_publish_check_and_list_entries(backend: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    from kiln.config import S3StorageConfig, StorageConfig
    from kiln.wiring import make_store

    if backend == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"kiln-modcache-{os.getpid()}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test")
        client.create_bucket(Bucket=bucket)
        config = StorageConfig(backend="s3", s3=S3StorageConfig(
            bucket=bucket, endpoint_url=endpoint, region="us-east-1", prefix="kiln",
            access_key_id="kiln-test", secret_access_key="kiln-test", addressing_style="path"))
    else:
        config = StorageConfig(backend="local")
        config.local.path = tmp_path / "store"
    objects = objects_of(make_store(config))
    store = ModuleStore(objects)
    data = os.urandom(3 * 1024 * 1024)
    store.put("example.com/m/@v/v1.0.0.zip", _bytes(data))
    held = store.get("example.com/m/@v/v1.0.0.zip")
    assert held is not None and held.read() == data
    entries, orphans = store.entries()
    assert [(e.path, e.size) for e in entries] == [("modcache/example.com/m/@v/v1.0.0.zip",
                                                    len(data))]
    assert orphans == []
    # the stored bytes changed behind the cache's back: refused and deleted, never served
    objects.publish("modcache/example.com/m/@v/v1.0.0.zip", _bytes(data[:-1] + b"x"))
    from kiln.modproxy.store import Corrupt

    with pytest.raises(Corrupt):
        store.get("example.com/m/@v/v1.0.0.zip")
    assert store.get("example.com/m/@v/v1.0.0.zip") is None
    assert store.entries() == ([], [])


def test_the_janitor_collects_the_module_cache_only_when_it_is_on(db_url: str,
                                                                  tmp_path: Path) -> None:
    from kiln.config import Config
    from kiln.wiring import make_janitor

    settings: dict[str, Any] = {"database": {"url": db_url},
                                "storage": {"local": {"path": str(tmp_path / "artifacts")}}}
    off = make_janitor(Config.model_validate(settings), url=db_url)
    try:
        assert "modcache_gc" not in [job.name for job in off.jobs]
    finally:
        off.queue.pool.close()
    store = ModuleStore(DirectoryObjects(tmp_path / "artifacts"), clock=lambda: 1.0)  # 1970
    store.put("example.com/old/@v/v1.0.0.mod", _bytes(b"module example.com/old\n"))
    ModuleStore(DirectoryObjects(tmp_path / "artifacts")).put(
        "example.com/new/@v/v1.0.0.mod", _bytes(b"module example.com/new\n"))
    janitor = make_janitor(Config.model_validate(
        {**settings, "modcache": {"enabled": True, "max_age": 86400}}), url=db_url)
    try:
        assert janitor.run_once(only=["modcache_gc"]) == {"modcache_gc": "done"}
    finally:
        janitor.queue.pool.close()
    assert [e.path for e in store.entries()[0]] == ["modcache/example.com/new/@v/v1.0.0.mod"]
