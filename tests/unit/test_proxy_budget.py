"""Each request's module-proxy budget, against a real HTTP proxy that sprawls or hangs."""

from __future__ import annotations

import json
import re
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kiln.request.spec import CADDY_MODULE, BuildRequest
from kiln.resolve.budget import (
    ProxyBudget,
    ProxyCallsExceeded,
    ProxyDeadlineExceeded,
    ProxyLimits,
)
from kiln.resolve.cache import MemoryResolutionCache
from kiln.resolve.proxy import ModuleProxy
from kiln.resolve.resolver import Resolver, resolve_spec

#: modules the proxy has: github.com/acme/p<N>, each at v1.0.0, and Caddy
ACME = re.compile(r"github\.com/acme/p[0-9]+")
CADDY_VERSION = "v2.8.4"


class FakeProxy:
    """A Go module proxy on 127.0.0.1 with every github.com/acme/p<N> module at v1.0.0.

    It records each request it gets; with ``hang`` set it answers nothing and waits until
    the client closes the connection, which it records in ``closed``.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[str] = []
        self.hang = False
        #: set when a hanging request's client closed its connection
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def count(self) -> int:
        """Return how many requests reached the proxy."""
        with self._lock:
            return len(self.requests)

    def answer(self, path: str) -> tuple[int, bytes]:
        module, _, rest = path.lstrip("/").partition("/@")
        version = CADDY_VERSION if module == CADDY_MODULE else "v1.0.0"
        if module != CADDY_MODULE and not ACME.fullmatch(module):
            return 404, b"not found: unknown module"
        if rest == "v/list":
            return 200, f"{version}\n".encode()
        if rest == f"v/{version}.info":
            return 200, json.dumps({"Version": version,
                                    "Time": "2024-07-03T19:04:32Z"}).encode()
        if rest == f"v/{version}.mod":
            return 200, f"module {module}\n\ngo 1.22\n".encode()
        return 404, b"not found: no such version"

    def wait_for_close(self, handler: BaseHTTPRequestHandler) -> None:
        """Answer nothing until the client hangs up (or the server stops)."""
        sock = handler.connection
        while not self._stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    data = sock.recv(1)
                except OSError:
                    data = b""
                if not data:
                    self.closed.set()
                    return

    def stop(self) -> None:
        self._stopping.set()


def make_handler(proxy: FakeProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with proxy._lock:
                proxy.requests.append(self.path)
            if proxy.hang:
                proxy.wait_for_close(self)
                self.close_connection = True
                return
            status, body = proxy.answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def serving() -> Iterator[FakeProxy]:
    """Run a FakeProxy on 127.0.0.1 for the length of the block."""
    proxy = FakeProxy()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield proxy
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def fake_proxy() -> Iterator[FakeProxy]:
    with serving() as proxy:
        yield proxy


def resolver(goproxy: str, *, max_calls: int = 64, deadline: float = 30.0,
             timeout: float = 30.0) -> Resolver:
    return Resolver(ModuleProxy(goproxy, timeout=timeout), cache=MemoryResolutionCache(),
                    limits=ProxyLimits(max_calls=max_calls, deadline=deadline))


def request(*plugins: str, caddy: str = CADDY_VERSION) -> BuildRequest:
    return BuildRequest.create(os="linux", arch="amd64", caddy_version=caddy, plugins=plugins)


def resolve(r: Resolver, req: BuildRequest) -> Any:
    return resolve_spec(req, r.for_request(), go_version="go1.25.0", sandbox="process")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# The budget itself
# ---------------------------------------------------------------------------


def test_a_call_never_gets_more_time_than_is_left() -> None:
    clock = Clock()
    budget = ProxyBudget(max_calls=10, deadline=5.0, clock=clock)
    assert budget.spend(20.0) == 5.0  # proxy_timeout 20 s, but only 5 s are left
    clock.now += 4.0
    assert budget.spend(20.0) == pytest.approx(1.0)
    assert budget.spend(0.5) == 0.5  # a shorter proxy_timeout still applies
    clock.now += 1.0
    with pytest.raises(ProxyDeadlineExceeded) as exc:
        budget.spend(20.0)
    assert str(exc.value) == "the Go module proxy did not answer within 5 s: try again shortly"
    assert budget.calls == 3


def test_the_call_after_the_last_is_refused() -> None:
    budget = ProxyBudget(max_calls=2, deadline=5.0, clock=Clock())
    budget.spend(1.0)
    budget.spend(1.0)
    with pytest.raises(ProxyCallsExceeded) as exc:
        budget.spend(1.0)
    assert "this request needs more than 2 module-proxy look-ups" in str(exc.value)
    assert budget.calls == 2


# ---------------------------------------------------------------------------
# Through the resolver, against a real HTTP proxy
# ---------------------------------------------------------------------------


def test_a_request_past_its_calls_stops_there(fake_proxy: FakeProxy) -> None:
    r = resolver(fake_proxy.url, max_calls=5)
    # Caddy (1 call) and 8 plugins at latest (a list and a go.mod each): 17 calls
    with pytest.raises(ProxyCallsExceeded) as exc:
        resolve(r, request(*(f"github.com/acme/p{n}" for n in range(8))))
    assert "more than 5 module-proxy look-ups" in str(exc.value)
    assert fake_proxy.count() == 5


def test_a_made_up_package_path_spends_from_the_same_budget(fake_proxy: FakeProxy) -> None:
    # six candidate module roots, none real: up to three calls each
    path = "github.com/nobody/a/b/c/d/e"
    with pytest.raises(ProxyCallsExceeded):
        resolver(fake_proxy.url, max_calls=7).for_request().resolve_package(path, "latest")
    assert fake_proxy.count() == 7


def test_each_request_gets_its_own_budget(fake_proxy: FakeProxy) -> None:
    r = resolver(fake_proxy.url, max_calls=5)
    for n in range(4):  # Caddy is cached after the first; each plugin costs 2
        resolve(r, request(f"github.com/acme/p{n}", f"github.com/acme/p{n + 10}"))
    assert fake_proxy.count() == 1 + 4 * 4


def test_cached_answers_cost_nothing(fake_proxy: FakeProxy) -> None:
    r = resolver(fake_proxy.url, max_calls=5)
    plugins = [f"github.com/acme/p{n}" for n in range(12)]
    for plugin in plugins:
        resolve(r, request(plugin))
    asked = fake_proxy.count()
    spec = resolve(r, request(*plugins))  # 12 plugins, budget 5: every answer is cached
    assert [p.version for p in spec.plugins] == ["v1.0.0"] * 12
    assert fake_proxy.count() == asked


def test_a_file_proxy_costs_no_calls(tmp_path: Path) -> None:
    root = tmp_path / "proxy"
    for module in ("github.com/acme/p1", "github.com/acme/p2", CADDY_MODULE):
        d = root / module / "@v"
        d.mkdir(parents=True)
        version = CADDY_VERSION if module == CADDY_MODULE else "v1.0.0"
        (d / "list").write_text(version + "\n")
        (d / f"{version}.info").write_text(json.dumps({"Version": version}))
        (d / f"{version}.mod").write_text(f"module {module}\n")
    spec = resolve(resolver(root.as_uri(), max_calls=1),
                   request("github.com/acme/p1", "github.com/acme/p2", caddy="latest"))
    assert spec.caddy_version == CADDY_VERSION and len(spec.plugins) == 2


def test_a_hanging_proxy_is_given_up_at_the_deadline(fake_proxy: FakeProxy) -> None:
    fake_proxy.hang = True
    deadline = 2.0
    # each proxy request may take 60 s (build.proxy_timeout), the request 2 s
    r = resolver(fake_proxy.url, deadline=deadline, timeout=60.0)
    started = time.monotonic()
    with pytest.raises(ProxyDeadlineExceeded) as exc:
        resolve(r, request("github.com/acme/p1"))
    elapsed = time.monotonic() - started
    assert "did not answer within 2 s" in str(exc.value)
    # Kiln hung up: the proxy is not left holding the call
    assert fake_proxy.closed.wait(10)
    assert fake_proxy.count() == 1
    assert elapsed < 3 * deadline  # generous: the call alone could otherwise take 60 s
