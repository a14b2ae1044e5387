"""What the compat endpoints stand on, on a real PostgreSQL: the waiter, the catalog mirror,
and version resolution checked against the go command itself."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from psycopg_pool import ConnectionPool

from kiln.api.waiter import BuildWaiter
from kiln.config import load_config
from kiln.db.builds import QueueManager
from kiln.db.catalog import CatalogStore
from kiln.db.notify import EVENTS_CHANNEL, Notifier
from kiln.db.pool import connect
from kiln.janitor.catalog_mirror import CatalogMirror
from kiln.request.catalog import Catalog
from kiln.resolve.cache import MemoryResolutionCache
from kiln.resolve.proxy import ModuleProxy
from kiln.resolve.resolver import Resolver
from tests.fixtures import goproxy as gp

KEY = hashlib.sha256(b"compat").hexdigest()
SPEC = {"os": "linux", "arch": "amd64",
        "plugins": [{"package": "github.com/acme/hello", "module": "github.com/acme/hello",
                     "version": "v1.0.0"}]}


@pytest.fixture
def queue(db_url: str) -> Iterator[QueueManager]:
    pool = ConnectionPool(db_url, min_size=1, max_size=6, kwargs={"autocommit": True}, open=True)
    try:
        yield QueueManager(pool)
    finally:
        pool.close()


@pytest.fixture
def notifier(db_url: str) -> Iterator[Notifier]:
    config = load_config(env={"CONFIG_PATH": "/dev/null"})
    notifier = Notifier(lambda: connect(db_url, config.database), channels=[EVENTS_CHANNEL])
    try:
        yield notifier
    finally:
        notifier.stop()


def register(queue: QueueManager, worker: str = "w1") -> None:
    queue.register_worker(worker, hostname="h", pid=1, concurrency=1, sandbox="process",
                          go_version="go1.25.0")


def finish_soon(queue: QueueManager, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        assert queue.claim("w1", limit=1, lease_seconds=30)
        queue.complete(KEY, "w1", artifact_path="builds/x", artifact_size=1, artifact_sha256="0")
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_notification_ends_the_wait_long_before_any_poll(queue: QueueManager,
                                                           notifier: Notifier) -> None:
    register(queue)
    queue.enqueue(KEY, SPEC)
    waiter = BuildWaiter(queue=queue, notifier=notifier, worker_live_seconds=60, worker_wait=0,
                         poll_seconds=60, connected_poll_seconds=60)
    thread = finish_soon(queue, 0.5)
    started = time.monotonic()
    result = waiter.wait(KEY, timeout=30)
    thread.join()
    assert result.outcome == "final" and result.row is not None
    assert result.row.state == "succeeded"
    assert time.monotonic() - started < 10  # the poll would have taken 48 s at least
    assert notifier.subscribers() == 0 and waiter.waiting() == 0


def test_without_notifications_the_poll_finds_the_result(queue: QueueManager) -> None:
    register(queue)
    queue.enqueue(KEY, SPEC)
    waiter = BuildWaiter(queue=queue, notifier=None, worker_live_seconds=60, worker_wait=0,
                         poll_seconds=0.3, tick_seconds=0.1)
    thread = finish_soon(queue, 0.3)
    result = waiter.wait(KEY, timeout=30)
    thread.join()
    assert result.outcome == "final" and result.row and result.row.state == "succeeded"


def test_gone_timeout_and_no_worker(queue: QueueManager, notifier: Notifier) -> None:
    queue.enqueue(KEY, SPEC)
    waiter = BuildWaiter(queue=queue, notifier=notifier, worker_live_seconds=60,
                         worker_wait=0, tick_seconds=0.05)
    # nobody could ever build it
    assert waiter.wait(KEY, timeout=30).outcome == "no_worker"
    register(queue)
    time.sleep(2.1)  # the live-worker count is shared for two seconds
    assert waiter.wait(KEY, timeout=0.3).outcome == "timeout"
    left = threading.Event()
    threading.Timer(0.3, left.set).start()
    result = waiter.wait(KEY, timeout=30, gone=left.is_set)
    assert result.outcome == "gone" and result.waited < 2
    assert notifier.subscribers() == 0 and waiter.waiting() == 0
    patient = BuildWaiter(queue=queue, notifier=notifier, worker_live_seconds=60,
                          worker_wait=30, tick_seconds=0.05)
    assert waiter.wait("0" * 64, timeout=1).outcome == "missing"
    assert patient.wait(KEY, timeout=0.2).outcome == "timeout"


def test_only_a_worker_with_the_builds_sandbox_and_go_counts_as_live(
        queue: QueueManager, notifier: Notifier) -> None:
    # a worker of another sandbox or Go would never claim the build: held, it would wait in
    # vain for max_wait instead of hearing after worker_wait that nobody can build it
    spec = {**SPEC, "sandbox": "docker:kiln-sandbox@sha256:new", "go_version": "go1.27.3"}
    queue.enqueue(KEY, spec)
    queue.register_worker("w-process", hostname="h", pid=1, concurrency=1,
                          sandbox="process:go1.27.3", go_version="go1.27.3")
    queue.register_worker("w-old-go", hostname="h", pid=2, concurrency=1,
                          sandbox="docker:kiln-sandbox@sha256:new", go_version="go1.26.0")
    waiter = BuildWaiter(queue=queue, notifier=notifier, worker_live_seconds=60,
                         worker_wait=0, tick_seconds=0.05)
    assert waiter.wait(KEY, timeout=30).outcome == "no_worker"
    queue.register_worker("w-new", hostname="h", pid=3, concurrency=1,
                          sandbox="docker:kiln-sandbox@sha256:new", go_version="go1.27.3")
    time.sleep(2.1)  # the live-worker count is shared for two seconds
    assert waiter.wait(KEY, timeout=0.3).outcome == "timeout"


class _Upstream(BaseHTTPRequestHandler):
    """An upstream /api/packages with an ETag; ``status`` makes it fail."""

    body = b""
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
        if type(self).status != 200:
            self.send_response(type(self).status)
            self.end_headers()
            return
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        """Stay quiet."""


def test_the_mirror_copies_upstream_and_adds_kiln_downloads(queue: QueueManager) -> None:
    _Upstream.body = json.dumps({"status_code": 200, "result": [
        {"path": "github.com/acme/hello", "downloads": 10,
         "modules": [{"name": "http.handlers.hello"}]},
        {"path": "not a path"},
    ]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/api/packages"
    try:
        store = CatalogStore(queue.pool)
        mirror = CatalogMirror(store=store, url=url)
        assert mirror.refresh() == f"mirrored 1 packages from {url}"
        assert mirror.refresh() == "unchanged"
        _Upstream.status = 500
        assert mirror.refresh() == ""
        assert "answered 500" in (store.get_mirror(url) or {})["error"]
    finally:
        _Upstream.status = 200
        server.shutdown()
        server.server_close()
    queue.enqueue(KEY, SPEC)
    with queue.pool.connection() as conn:
        conn.execute("UPDATE kiln_builds SET downloads = 5")
    packages = Catalog(store=store, url=url).packages()
    assert [(p.path, p.downloads) for p in packages] == [("github.com/acme/hello", 15)]


def test_the_api_answers_503_in_the_error_shape_when_the_database_is_down(
        tmp_path: Path) -> None:
    from kiln.api.app import create_app
    from kiln.wiring import make_services

    config = load_config(env={"CONFIG_PATH": "/dev/null",
                              "KILN_DATABASE__URL": "postgresql://kiln@127.0.0.1:1/kiln",
                              "KILN_DATABASE__CONNECT_TIMEOUT": "1",
                              "KILN_STORAGE__LOCAL__PATH": str(tmp_path)})
    services = make_services(config)
    try:
        client = testing.TestClient(create_app(services))
        resp = client.simulate_get("/api/download", query_string="os=linux&arch=amd64")
        assert resp.status_code == 503
        assert resp.json["status_code"] == 503
        assert resp.json["error"]["id"] == resp.headers["X-Request-Id"]
        assert "database" in resp.json["error"]["message"]
    finally:
        services.queue.pool.close()


# Resolution must agree with what the go command picks against the same proxy.
QUERIES = [
    (gp.CADDY, "latest"),
    (gp.CADDY, "v2.8.0"),
    (gp.CADDY, "v2.8"),
    (gp.CADDY, gp.MASTER_PSEUDO),
    (gp.CADDY, gp.MASTER_BRANCH),
    (gp.CADDY, gp.MASTER_COMMIT[:7]),
    (gp.HELLO, "latest"),
    (gp.DNS, "v2"),
]


@pytest.mark.slow
def test_resolution_agrees_with_go_list(proxy_server: gp.ProxyServer, go_cache_dir: Path,
                                        tmp_path: Path) -> None:
    resolver = Resolver(ModuleProxy(proxy_server.url), cache=MemoryResolutionCache())
    env = gp.go_env(proxy_server.url, go_cache_dir, GOFLAGS="")
    for module, query in QUERIES:
        out = subprocess.run([str(gp.find_go()), "list", "-m", "-json", f"{module}@{query}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert resolver.resolve(module, query) == json.loads(out.stdout)["Version"], (module, query)
