"""The module proxy client and resolver against a hand-built proxy tree, as file:// and over HTTP."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kiln.errors import SpecError
from kiln.gomod.gomodfile import parse_retractions
from kiln.gomod.module import encode_path, encode_version
from kiln.request.spec import CADDY_MODULE, BuildRequest, PluginRequest, ResolvedPlugin
from kiln.resolve.cache import MemoryResolutionCache
from kiln.resolve.proxy import ModuleNotFound, ModuleProxy, ProxyUnavailable, VersionInfo
from kiln.resolve.resolver import Resolver, resolve_spec

PSEUDO_UNTAGGED = "v0.0.0-20240703190432-89f16b99c18e"
PSEUDO_CADDY_MASTER = "v2.9.0-beta.1.0.20240801120000-abcdefabcdef"

# ---------------------------------------------------------------------------
# A proxy tree, written by hand: @v/list, .info, .mod and @latest files
# ---------------------------------------------------------------------------


def _escape(s: str) -> str:
    return "".join("!" + c.lower() if c.isupper() else c for c in s)


class ProxyTree:
    """Write modules into a directory laid out as the GOPROXY protocol expects."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, module: str) -> Path:
        d = self.root / _escape(module) / "@v"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add(
        self,
        module: str,
        versions: list[str],
        *,
        listed: list[str] | None = None,
        go_mod: dict[str, str] | None = None,
        synthesized: tuple[str, ...] = (),
    ) -> None:
        d = self.dir(module)
        (d / "list").write_text("".join(v + "\n" for v in (versions if listed is None else listed)))
        for v in versions:
            self.info(module, v, v)
            if go_mod and v in go_mod:
                text = go_mod[v]
            elif v in synthesized:
                text = f"module {module}\n"
            else:
                text = f"module {module}\n\ngo 1.22\n"
            (d / f"{_escape(v)}.mod").write_text(text)

    def info(self, module: str, query: str, version: str) -> None:
        body = json.dumps({"Version": version, "Time": "2024-07-03T19:04:32Z"})
        (self.dir(module) / f"{_escape(query)}.info").write_text(body)

    def latest(self, module: str, version: str) -> None:
        self.dir(module)
        body = json.dumps({"Version": version, "Time": "2024-07-03T19:04:32Z"})
        (self.root / _escape(module) / "@latest").write_text(body)


def build_tree(root: Path) -> ProxyTree:
    tree = ProxyTree(root)
    tree.add(
        CADDY_MODULE,
        ["v2.7.6", "v2.8.0", "v2.8.4", "v2.9.0-beta.1", "v2.8.5-0.20240801000000-abcdefabcdef"],
        listed=[
            "v2.8.0",
            "v2.7.6",
            "v2.9.0-beta.1",
            "v2.8.4",
            "v2.8.5-0.20240801000000-abcdefabcdef",
        ],
    )
    # Branches and commits: a real proxy answers these; only HTTP proxies are asked.
    tree.info(CADDY_MODULE, "master", PSEUDO_CADDY_MASTER)
    tree.info(CADDY_MODULE, "abcdefa", PSEUDO_CADDY_MASTER)
    tree.info(CADDY_MODULE, PSEUDO_CADDY_MASTER, PSEUDO_CADDY_MASTER)
    tree.add("github.com/x/plug", ["v0.1.0", "v0.2.0"])
    tree.add("github.com/x/two", ["v1.0.0"])
    tree.add("github.com/x/two/v2", ["v2.0.0", "v2.1.0"])
    tree.add("github.com/Azure/thing", ["v1.0.0", "v1.1.0-RC1"])
    tree.add(
        "github.com/x/retract",
        ["v1.0.0", "v1.1.0", "v1.2.0"],
        go_mod={
            "v1.2.0": "module github.com/x/retract\n\ngo 1.22\n\n"
            "retract [v1.1.0, v1.2.0] // both broke TLS\n"
        },
    )
    tree.add("github.com/x/pre", ["v0.1.0-alpha", "v0.1.0-beta"])
    tree.add("github.com/x/untagged", [])
    tree.latest("github.com/x/untagged", PSEUDO_UNTAGGED)
    tree.info("github.com/x/untagged", PSEUDO_UNTAGGED, PSEUDO_UNTAGGED)
    tree.add(
        "github.com/x/legacy",
        ["v1.0.0", "v2.0.0+incompatible", "v2.1.0+incompatible"],
        synthesized=("v1.0.0",),
    )
    tree.add("github.com/x/modern", ["v1.5.0", "v2.0.0+incompatible"])
    tree.add("gopkg.in/yaml.v3", ["v3.0.0", "v3.0.1"])
    return tree


@pytest.fixture
def tree(tmp_path: Path) -> ProxyTree:
    return build_tree(tmp_path / "proxy")


# ---------------------------------------------------------------------------
# An HTTP proxy: ThreadingHTTPServer serving the tree, counting requests
# ---------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    requests: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0

    def count(self, fragment: str = "") -> int:
        return sum(1 for r in self.requests if fragment in r)


@contextmanager
def serve(root: Path) -> Iterator[Served]:
    served = Served(url="")

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            served.requests.append(self.path)
            served.authorizations.append(self.headers.get("Authorization", ""))
            for fragment, code in served.status.items():
                if fragment in self.path:
                    self.send_error(code, f"synthetic {code}")
                    return
            if served.delay:
                time.sleep(served.delay)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http(tree: ProxyTree) -> Iterator[Served]:
    with serve(tree.root) as served:
        yield served


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def resolver_for(goproxy: str, clock: FakeClock | None = None, **kwargs: Any) -> Resolver:
    return Resolver(
        ModuleProxy(goproxy, timeout=5),
        cache=MemoryResolutionCache(),
        clock=clock or FakeClock(),
        **kwargs,
    )


@pytest.fixture(params=["file", "http"])
def goproxy(request: pytest.FixtureRequest, tree: ProxyTree) -> Iterator[str]:
    if request.param == "file":
        yield tree.root.as_uri()
    else:
        with serve(tree.root) as served:
            yield served.url


# ---------------------------------------------------------------------------
# Case encoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "escaped"),
    [
        ("ascii.com/abcdefghijklmnopqrstuvwxyz.-/~_0123456789", None),
        ("github.com/GoogleCloudPlatform/omega", "github.com/!google!cloud!platform/omega"),
        ("github.com/Azure/azure-sdk-for-go", "github.com/!azure/azure-sdk-for-go"),
        ("github.com/Sirupsen/logrus", "github.com/!sirupsen/logrus"),
        ("github.com/caddyserver/caddy/v2", None),
    ],
)
def test_encode_path(path: str, escaped: str | None) -> None:
    assert encode_path(path) == (escaped or path)


@pytest.mark.parametrize(
    "path", ["github.com/!123/logrus", "Github.com/x/y", "../x", "x.y/z/v1", ""]
)
def test_encode_path_refuses_invalid(path: str) -> None:
    with pytest.raises(ValueError):
        encode_path(path)


def test_encode_version() -> None:
    assert encode_version("v1.0.0-RC1") == "v1.0.0-!r!c1"
    assert encode_version("v2.0.0+incompatible") == "v2.0.0+incompatible"
    assert encode_version("Master") == "!master"
    for bad in ["feature/x", "a!b", "", "..", "x.", "v1\x00", "мастер"]:
        with pytest.raises(ValueError):
            encode_version(bad)


# ---------------------------------------------------------------------------
# ModuleProxy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "goproxy",
    [
        "direct",
        "off",
        "https://proxy.golang.org,direct",
        "",
        " , ",
        "ftp://x",
        "proxy.golang.org",
        "a,,b",
    ],
)
def test_goproxy_refused(goproxy: str) -> None:
    with pytest.raises(ValueError) as exc:
        ModuleProxy(goproxy)
    if "direct" in goproxy or goproxy == "off":
        assert "Kiln needs a module proxy" in str(exc.value)


def test_goproxy_list_parsed() -> None:
    proxy = ModuleProxy("https://a.example/,http://b.example|file:///tmp/c")
    assert proxy.urls == ("https://a.example", "http://b.example", "file:///tmp/c")


def test_proxy_protocol(goproxy: str) -> None:
    proxy = ModuleProxy(goproxy)
    assert proxy.list(CADDY_MODULE) == ["v2.7.6", "v2.8.0", "v2.8.4", "v2.9.0-beta.1"]
    info = proxy.info(CADDY_MODULE, "v2.8.4")
    assert info.version == "v2.8.4"
    assert info.time is not None and info.time.year == 2024
    assert proxy.list("github.com/Azure/thing") == ["v1.0.0", "v1.1.0-RC1"]
    assert proxy.info("github.com/Azure/thing", "v1.1.0-RC1") == VersionInfo(
        "v1.1.0-RC1", proxy.info("github.com/Azure/thing", "v1.1.0-RC1").time
    )
    assert proxy.latest("github.com/x/untagged") == VersionInfo(
        PSEUDO_UNTAGGED,
        proxy.latest("github.com/x/untagged").time,  # type: ignore[union-attr]
    )
    assert proxy.latest(CADDY_MODULE) is None
    assert proxy.go_mod(CADDY_MODULE, "v2.8.4") == f"module {CADDY_MODULE}\n\ngo 1.22\n"
    with pytest.raises(ModuleNotFound) as exc:
        proxy.list("github.com/nobody/nothing")
    assert (
        str(exc.value) == "unknown module github.com/nobody/nothing: not found on the module proxy"
    )
    with pytest.raises(ModuleNotFound) as exc:
        proxy.info(CADDY_MODULE, "v9.9.9")
    assert str(exc.value).startswith(f'{CADDY_MODULE} has no version matching "v9.9.9"')


def test_file_proxy_does_not_answer_branches(tree: ProxyTree) -> None:
    proxy = ModuleProxy(tree.root.as_uri())
    # The file exists, but Go does not ask a file:// proxy for non-semver queries.
    assert (tree.root / _escape(CADDY_MODULE) / "@v" / "master.info").exists()
    with pytest.raises(ModuleNotFound):
        proxy.info(CADDY_MODULE, "master")


def test_http_proxy_answers_branches(http: Served) -> None:
    proxy = ModuleProxy(http.url)
    assert proxy.info(CADDY_MODULE, "master").version == PSEUDO_CADDY_MASTER
    with pytest.raises(ModuleNotFound) as exc:
        proxy.info(CADDY_MODULE, "feature/x")
    assert "cannot be looked up through a module proxy" in str(exc.value)


def test_closed_port_is_unavailable() -> None:
    proxy = ModuleProxy(closed_port_url(), timeout=2)
    with pytest.raises(ProxyUnavailable):
        proxy.list(CADDY_MODULE)
    with pytest.raises(ProxyUnavailable):
        proxy.info(CADDY_MODULE, "v2.8.4")


def test_server_errors_are_unavailable(http: Served) -> None:
    http.status["@v/list"] = 503
    with pytest.raises(ProxyUnavailable) as exc:
        ModuleProxy(http.url).list(CADDY_MODULE)
    assert "503" in str(exc.value)


def test_timeout_is_unavailable(http: Served) -> None:
    http.delay = 2.0
    with pytest.raises(ProxyUnavailable):
        ModuleProxy(http.url, timeout=0.2).list(CADDY_MODULE)


def test_gone_falls_through_to_next_proxy(tree: ProxyTree, tmp_path: Path) -> None:
    with serve(tmp_path / "empty") as empty, serve(tree.root) as full:
        empty.status["/"] = 410
        proxy = ModuleProxy(f"{empty.url},{full.url}")
        assert proxy.list(CADDY_MODULE)[-1] == "v2.9.0-beta.1"
        assert empty.count("@v/list") == 1 and full.count("@v/list") == 1
        # Not found everywhere: ModuleNotFound, not a failure.
        with pytest.raises(ModuleNotFound):
            proxy.list("github.com/nobody/nothing")


def test_comma_stops_on_error_pipe_falls_through(tree: ProxyTree) -> None:
    dead = closed_port_url()
    with serve(tree.root) as full:
        with pytest.raises(ProxyUnavailable):
            ModuleProxy(f"{dead},{full.url}", timeout=2).list(CADDY_MODULE)
        assert full.count() == 0
        assert ModuleProxy(f"{dead}|{full.url}", timeout=2).list(CADDY_MODULE)[0] == "v2.7.6"
        # When every proxy failed and one of them really failed, say unavailable.
        with pytest.raises(ProxyUnavailable):
            ModuleProxy(f"{dead}|{full.url}", timeout=2).list("github.com/nobody/nothing")


def test_credentials_in_goproxy_become_basic_auth(http: Served) -> None:
    url = http.url.replace("http://", "http://kiln:s3cr%40t@")
    proxy = ModuleProxy(url)
    assert proxy.list(CADDY_MODULE)[0] == "v2.7.6"
    assert http.authorizations[-1] == "Basic " + base64.b64encode(b"kiln:s3cr@t").decode()
    assert "s3cr" not in repr(proxy)
    http.status["@v/list"] = 500
    with pytest.raises(ProxyUnavailable) as exc:
        proxy.list(CADDY_MODULE)
    assert "s3cr" not in str(exc.value)


def test_file_proxy_falls_through_to_http(tmp_path: Path, tree: ProxyTree) -> None:
    empty = tmp_path / "empty-file-proxy"
    empty.mkdir()
    with serve(tree.root) as full:
        proxy = ModuleProxy(f"{empty.as_uri()},{full.url}")
        assert proxy.info(CADDY_MODULE, "v2.8.4").version == "v2.8.4"


def test_malformed_info_is_unavailable(tree: ProxyTree) -> None:
    (tree.dir(CADDY_MODULE) / "v2.8.4.info").write_text("<html>not json</html>")
    with pytest.raises(ProxyUnavailable):
        ModuleProxy(tree.root.as_uri()).info(CADDY_MODULE, "v2.8.4")
    (tree.dir(CADDY_MODULE) / "v2.8.4.info").write_text('{"Version": "$(id)"}')
    with pytest.raises(ProxyUnavailable):
        ModuleProxy(tree.root.as_uri()).info(CADDY_MODULE, "v2.8.4")


# ---------------------------------------------------------------------------
# Resolver: cmd/go query semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "query", "want"),
    [
        (CADDY_MODULE, "latest", "v2.8.4"),
        (CADDY_MODULE, "", "v2.8.4"),
        (CADDY_MODULE, "v2.8.0", "v2.8.0"),
        (CADDY_MODULE, "v2.9.0-beta.1", "v2.9.0-beta.1"),
        (CADDY_MODULE, "v2", "v2.8.4"),
        (CADDY_MODULE, "v2.8", "v2.8.4"),
        (CADDY_MODULE, "v2.7", "v2.7.6"),
        (CADDY_MODULE, "v2.8.4+build.5", "v2.8.4"),
        (CADDY_MODULE, PSEUDO_CADDY_MASTER, PSEUDO_CADDY_MASTER),
        ("github.com/x/pre", "latest", "v0.1.0-beta"),
        ("github.com/x/retract", "latest", "v1.0.0"),
        ("github.com/x/retract", "v1", "v1.0.0"),
        ("github.com/x/retract", "v1.1.0", "v1.1.0"),
        ("github.com/x/untagged", "latest", PSEUDO_UNTAGGED),
        ("github.com/x/untagged", PSEUDO_UNTAGGED, PSEUDO_UNTAGGED),
        ("github.com/x/legacy", "latest", "v2.1.0+incompatible"),
        ("github.com/x/modern", "latest", "v1.5.0"),
        ("github.com/x/modern", "v2.0.0", "v2.0.0+incompatible"),
        ("github.com/x/modern", "v2", "v2.0.0+incompatible"),
        ("github.com/x/two", "latest", "v1.0.0"),
        ("github.com/x/two/v2", "latest", "v2.1.0"),
        ("github.com/x/two/v2", "v2.0", "v2.0.0"),
        ("github.com/Azure/thing", "latest", "v1.0.0"),
        ("github.com/Azure/thing", "v1.1.0-RC1", "v1.1.0-RC1"),
        ("gopkg.in/yaml.v3", "latest", "v3.0.1"),
    ],
)
def test_resolve(goproxy: str, module: str, query: str, want: str) -> None:
    assert resolver_for(goproxy).resolve(module, query) == want


@pytest.mark.parametrize(
    ("module", "query", "message"),
    [
        (
            "github.com/nobody/nothing",
            "latest",
            "unknown module github.com/nobody/nothing: not found on the module proxy",
        ),
        (CADDY_MODULE, "v9", f'{CADDY_MODULE} has no version matching "v9"'),
        (CADDY_MODULE, "v2.10", f'{CADDY_MODULE} has no version matching "v2.10"'),
        # As in Go, "v2.9" means >= v2.9.0, so v2.9.0's prereleases do not match it.
        (CADDY_MODULE, "v2.9", f'{CADDY_MODULE} has no version matching "v2.9"'),
        (CADDY_MODULE, "v2.8.99", f'{CADDY_MODULE} has no version matching "v2.8.99"'),
        (CADDY_MODULE, "v1.0.0", f'{CADDY_MODULE} has no version matching "v1.0.0"'),
        ("github.com/x/two/v2", "v1.0.0", 'github.com/x/two/v2 has no version matching "v1.0.0"'),
        ("github.com/x/two", "v3.0.0", 'github.com/x/two has no version matching "v3.0.0"'),
    ],
)
def test_resolve_not_found(goproxy: str, module: str, query: str, message: str) -> None:
    with pytest.raises(ModuleNotFound) as exc:
        resolver_for(goproxy).resolve(module, query)
    assert str(exc.value).startswith(message)
    assert exc.value.module == module


def test_branches_and_commits_need_an_http_proxy(tree: ProxyTree, http: Served) -> None:
    assert resolver_for(http.url).resolve(CADDY_MODULE, "master") == PSEUDO_CADDY_MASTER
    assert resolver_for(http.url).resolve(CADDY_MODULE, "abcdefa") == PSEUDO_CADDY_MASTER
    with pytest.raises(ModuleNotFound):
        resolver_for(tree.root.as_uri()).resolve(CADDY_MODULE, "master")
    with pytest.raises(ModuleNotFound):
        resolver_for(http.url).resolve(CADDY_MODULE, "no-such-branch")


def test_resolve_validates_input(goproxy: str) -> None:
    resolver = resolver_for(goproxy)
    with pytest.raises(SpecError):
        resolver.resolve("github.com/x/../y", "latest")
    with pytest.raises(SpecError):
        resolver.resolve(CADDY_MODULE, "$(id)")


def test_available_versions(goproxy: str) -> None:
    resolver = resolver_for(goproxy)
    assert resolver.available_versions(CADDY_MODULE) == [
        "v2.9.0-beta.1",
        "v2.8.4",
        "v2.8.0",
        "v2.7.6",
    ]
    assert resolver.available_versions("github.com/x/untagged") == []
    with pytest.raises(ModuleNotFound):
        resolver.available_versions("github.com/nobody/nothing")


# ---------------------------------------------------------------------------
# Packages, subpackages and /vN paths
# ---------------------------------------------------------------------------


def test_resolve_package_finds_module_root(goproxy: str) -> None:
    resolver = resolver_for(goproxy)
    assert resolver.resolve_package("github.com/x/plug/caddyplug", "latest") == (
        "github.com/x/plug",
        "v0.2.0",
    )
    assert resolver.resolve_package("github.com/x/plug/a/b", "v0.1.0") == (
        "github.com/x/plug",
        "v0.1.0",
    )
    assert resolver.resolve_package("github.com/x/plug", "latest") == (
        "github.com/x/plug",
        "v0.2.0",
    )
    # The longest prefix that resolves wins: github.com/x/two/v2, not github.com/x/two.
    assert resolver.resolve_package("github.com/x/two/v2/caddy", "latest") == (
        "github.com/x/two/v2",
        "v2.1.0",
    )
    with pytest.raises(ModuleNotFound) as exc:
        resolver.resolve_package("github.com/nobody/nothing/sub", "latest")
    assert str(exc.value) == (
        "no module provides github.com/nobody/nothing/sub@latest: "
        "tried github.com/nobody/nothing/sub, github.com/nobody/nothing"
    )


def test_resolve_plugin_maps_major_versions(goproxy: str) -> None:
    resolver = resolver_for(goproxy)
    assert resolver.resolve_plugin(PluginRequest("github.com/x/two", "v2.1.0")) == ResolvedPlugin(
        "github.com/x/two/v2", "github.com/x/two/v2", "v2.1.0"
    )
    assert resolver.resolve_plugin(PluginRequest("github.com/x/two/caddy", "v2")) == ResolvedPlugin(
        "github.com/x/two/v2/caddy", "github.com/x/two/v2", "v2.1.0"
    )
    assert resolver.resolve_plugin(
        PluginRequest("github.com/x/two/v2", "v2.0.0")
    ) == ResolvedPlugin("github.com/x/two/v2", "github.com/x/two/v2", "v2.0.0")
    assert resolver.resolve_plugin(PluginRequest("github.com/x/two", "latest")) == ResolvedPlugin(
        "github.com/x/two", "github.com/x/two", "v1.0.0"
    )
    # No /v2 module exists: Go's +incompatible form is still found.
    assert resolver.resolve_plugin(
        PluginRequest("github.com/x/modern", "v2.0.0")
    ) == ResolvedPlugin("github.com/x/modern", "github.com/x/modern", "v2.0.0+incompatible")
    assert resolver.resolve_plugin(
        PluginRequest("github.com/x/plug/caddyplug", "latest")
    ) == ResolvedPlugin("github.com/x/plug/caddyplug", "github.com/x/plug", "v0.2.0")


# ---------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------


def test_latest_is_cached_until_ttl(tree: ProxyTree, http: Served) -> None:
    clock = FakeClock()
    resolver = resolver_for(http.url, clock, latest_ttl=300)
    assert resolver.resolve(CADDY_MODULE, "latest") == "v2.8.4"
    lists = http.count("@v/list")
    assert lists == 1
    total = http.count()
    clock.advance(299)
    assert resolver.resolve(CADDY_MODULE, "latest") == "v2.8.4"
    assert resolver.resolve(CADDY_MODULE, "v2.8.4") == "v2.8.4"  # learnt from the latest answer
    assert http.count() == total

    # A new release appears; it is picked up once the TTL has passed.
    tree.add(CADDY_MODULE, ["v2.7.6", "v2.8.0", "v2.8.4", "v2.9.0-beta.1", "v2.9.0"])
    clock.advance(2)
    assert resolver.resolve(CADDY_MODULE, "latest") == "v2.9.0"
    assert http.count("@v/list") == 2


def test_absolute_versions_are_cached_for_good(http: Served) -> None:
    clock = FakeClock()
    resolver = resolver_for(http.url, clock, latest_ttl=300)
    assert resolver.resolve(CADDY_MODULE, "v2.8.0") == "v2.8.0"
    assert http.count("v2.8.0.info") == 1
    clock.advance(10 * 365 * 86400)
    assert resolver.resolve(CADDY_MODULE, "v2.8.0") == "v2.8.0"
    assert resolver.resolve(CADDY_MODULE, PSEUDO_CADDY_MASTER) == PSEUDO_CADDY_MASTER
    assert resolver.resolve(CADDY_MODULE, PSEUDO_CADDY_MASTER) == PSEUDO_CADDY_MASTER
    assert http.count("v2.8.0.info") == 1
    assert http.count(f"{PSEUDO_CADDY_MASTER}.info") == 1


def test_branches_and_prefixes_expire(http: Served) -> None:
    clock = FakeClock()
    resolver = resolver_for(http.url, clock, latest_ttl=60)
    resolver.resolve(CADDY_MODULE, "master")
    resolver.resolve(CADDY_MODULE, "v2.8")
    resolver.resolve(CADDY_MODULE, "master")
    resolver.resolve(CADDY_MODULE, "v2.8")
    assert http.count("master.info") == 1
    assert http.count("@v/list") == 1
    clock.advance(61)
    resolver.resolve(CADDY_MODULE, "master")
    resolver.resolve(CADDY_MODULE, "v2.8")
    assert http.count("master.info") == 2
    assert http.count("@v/list") == 2


def test_subpackage_lookups_are_cached(http: Served) -> None:
    clock = FakeClock()
    resolver = resolver_for(http.url, clock)
    assert (
        resolver.resolve_package("github.com/x/plug/caddyplug", "latest")[0] == "github.com/x/plug"
    )
    first = http.count()
    assert http.count("github.com/x/plug/caddyplug/@v/list") == 1
    assert (
        resolver.resolve_package("github.com/x/plug/caddyplug", "latest")[0] == "github.com/x/plug"
    )
    assert http.count() == first
    clock.advance(3600)
    resolver.resolve_package("github.com/x/plug/caddyplug", "latest")
    assert http.count() > first


def test_shared_cache_serves_another_resolver(http: Served) -> None:
    cache = MemoryResolutionCache()
    clock = FakeClock()
    one = Resolver(ModuleProxy(http.url), cache=cache, clock=clock)
    two = Resolver(ModuleProxy(http.url), cache=cache, clock=clock)
    assert one.resolve(CADDY_MODULE, "latest") == "v2.8.4"
    before = http.count()
    assert two.resolve(CADDY_MODULE, "latest") == "v2.8.4"
    assert http.count() == before


def test_memory_cache_is_bounded_and_thread_safe() -> None:
    cache = MemoryResolutionCache(max_entries=100)

    def work(n: int) -> None:
        for i in range(200):
            cache.put(f"example.com/m{n}", f"v1.0.{i}", f"v1.0.{i}", float(i))
            cache.get(f"example.com/m{n}", f"v1.0.{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 100


def test_unavailable_proxy_is_not_cached_as_missing(tree: ProxyTree) -> None:
    with serve(tree.root) as served:
        served.status["@v/list"] = 502
        resolver = resolver_for(served.url)
        with pytest.raises(ProxyUnavailable):
            resolver.resolve(CADDY_MODULE, "latest")
        served.status.clear()
        assert resolver.resolve(CADDY_MODULE, "latest") == "v2.8.4"


# ---------------------------------------------------------------------------
# Retractions and whole specs
# ---------------------------------------------------------------------------


def test_parse_retractions() -> None:
    go_mod = """module example.com/m

go 1.22

retract v1.0.0 // published by mistake
retract [v1.1.0, v1.1.9]
retract (
    v1.3.0 // broken
    "v1.4.0"
    [v1.5.0, v1.5.3] // a range
)
require example.com/other v1.0.0 // retract v9.9.9 is not a directive here
"""
    assert parse_retractions(go_mod) == [
        ("v1.0.0", "v1.0.0"),
        ("v1.1.0", "v1.1.9"),
        ("v1.3.0", "v1.3.0"),
        ("v1.4.0", "v1.4.0"),
        ("v1.5.0", "v1.5.3"),
    ]


def test_resolve_spec(goproxy: str) -> None:
    request = BuildRequest.create(
        os="linux",
        arch="arm",
        arm="6",
        plugins=[
            "github.com/x/plug/caddyplug",
            "github.com/x/two@v2.0.0",
            f"{CADDY_MODULE}/modules/extra",
        ],
        replacements=["github.com/x/retract=github.com/x/pre"],
    )
    spec = resolve_spec(
        request, resolver_for(goproxy), go_version="go1.25.3", sandbox="kiln-sandbox:test"
    )
    assert spec.caddy_version == "v2.8.4"
    assert spec.plugins == (
        ResolvedPlugin(f"{CADDY_MODULE}/modules/extra", CADDY_MODULE, "v2.8.4"),
        ResolvedPlugin("github.com/x/plug/caddyplug", "github.com/x/plug", "v0.2.0"),
        ResolvedPlugin("github.com/x/two/v2", "github.com/x/two/v2", "v2.0.0"),
    )
    assert spec.replacements[0].new_version == "v0.1.0-beta"
    assert spec.goenv() == {"GOOS": "linux", "GOARCH": "arm", "GOARM": "6"}
    again = resolve_spec(
        request, resolver_for(goproxy), go_version="go1.25.3", sandbox="kiln-sandbox:test"
    )
    assert again.key() == spec.key()


def test_resolve_spec_refuses_conflicting_module_versions(goproxy: str) -> None:
    request = BuildRequest.create(
        os="linux",
        arch="amd64",
        plugins=["github.com/x/plug/a@v0.1.0", "github.com/x/plug/b@v0.2.0"],
    )
    with pytest.raises(SpecError) as exc:
        resolve_spec(request, resolver_for(goproxy), go_version="go1.25.3", sandbox="s")
    assert "same version" in str(exc.value)


def test_resolve_spec_unknown_plugin(goproxy: str) -> None:
    request = BuildRequest.create(os="linux", arch="amd64", plugins=["github.com/nobody/nothing"])
    with pytest.raises(ModuleNotFound) as exc:
        resolve_spec(request, resolver_for(goproxy), go_version="go1.25.3", sandbox="s")
    assert "github.com/nobody/nothing" in str(exc.value)


def test_a_long_made_up_package_path_costs_no_proxy_request_past_the_bound(
        http: Served) -> None:
    """Each candidate module costs up to three proxy requests: a deep path is refused first."""
    resolver = resolver_for(http.url)
    deep = "github.com/x/plug/" + "/".join(f"d{i}" for i in range(40))
    with pytest.raises(SpecError) as exc:
        resolver.resolve_package(deep, "latest")
    assert "tries at most 6" in str(exc.value) and "name the module itself" in str(exc.value)
    assert http.count() == 0
    # a package a few elements below its module is still found
    assert resolver.resolve_package("github.com/x/plug/a/b/c/d", "v0.1.0") == (
        "github.com/x/plug", "v0.1.0")
