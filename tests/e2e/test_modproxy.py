"""The fleet module cache end to end: a worker process serves its fetch steps through it.

The process sandbox test runs Kiln's real API and worker (modcache.enabled) against the
synthetic module proxy over HTTP; the docker test runs the docker sandbox's fetch steps on
the module cache's internal network, where they reach the worker's proxy and nothing beyond
the host.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from kiln.artifacts.local import LocalStore
from kiln.modproxy.cache import ModuleCache, SumDB
from kiln.modproxy.checksum import parse_gosumdb
from kiln.modproxy.server import ModuleProxyServer
from kiln.modproxy.store import ModuleStore, objects_of
from kiln.modproxy.upstream import Upstream
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import FETCH, Step
from kiln.worker.sandbox.docker_engine import MODCACHE_NETWORK, docker_client, internal_network
from tests import realcaddy as rc
from tests.dockerutil import ensure_sandbox_image
from tests.fixtures import goproxy as gp
from tests.fixtures.goproxy.paths import escape_path
from tests.integration.test_modproxy import Front, front_handler
from tests.sandboxes import (
    COMPILE_TIMEOUT_SECONDS,
    FETCH_TIMEOUT_SECONDS,
    docker_sandbox,
    process_sandbox,
)
from tests.service import KilnProcesses, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kiln_goproxy(proxy_server: gp.ProxyServer) -> str:
    return proxy_server.url


@pytest.fixture(scope="module")
def kiln_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty Go caches: every module goes through the module cache."""
    return tmp_path_factory.mktemp("modproxy-go-cache")


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_MODCACHE__ENABLED": "true", "KILN_METRICS__FLUSH_SECONDS": "0.2"}


def _metric(text: str, result: str) -> float:
    match = re.search(rf'^kiln_modcache_requests_total\{{result="{result}"\}} (\S+)$', text,
                      re.M)
    return float(match.group(1)) if match else 0.0


def test_a_worker_fetches_through_its_module_cache(
        kiln: KilnProcesses, proxy_server: gp.ProxyServer) -> None:
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_LATEST,
                           "plugins": [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"]}).json()
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "succeeded", final
    # the fetch steps went through the worker's proxy: what they fetched is in the store
    zip_file = (kiln.root / "artifacts" / "modcache" / escape_path(gp.HELLO) / "@v"
                / f"{gp.HELLO_VERSIONS[0]}.zip")
    assert zip_file.is_file() and zip_file.with_name(zip_file.name + ".meta").is_file()
    assert "module cache serving the GOPROXY protocol on http://127.0.0.1:" in kiln.log("worker")
    # and /metrics counts it, for the whole fleet
    text = wait_for("module cache counts in /metrics", lambda: (
        t if _metric(t := requests.get(kiln.url + "/metrics", timeout=10).text, "miss") > 0
        else None), timeout=30)
    assert "# HELP kiln_modcache_bytes_total" in text
    assert re.search(r'^kiln_modcache_bytes_total\{source="upstream"\} [1-9]', text, re.M)

    # the build shared its module set; the same plugins for another platform skip the
    # fetch steps (this worker has the modules: the set's tar is not even read)
    sets = kiln.root / "artifacts" / "modcache" / "sets"
    wait_for("the module set shared", lambda: list(sets.glob("*.json.meta")) or None,
             timeout=60)
    other = kiln.post_build({"os": "linux", "arch": "arm64", "caddy_version": gp.CADDY_LATEST,
                             "plugins": [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"]}).json()
    assert kiln.wait_build(other["key"])["state"] == "succeeded"
    log = requests.get(f"{kiln.url}/api/builds/{other['key']}/log", timeout=10).text
    assert "fetch steps skipped" in log and "go get" not in log, log
    wait_for("the module set counted in /metrics", lambda: re.search(
        r'^kiln_modcache_sets_total\{result="local"\} [1-9]',
        requests.get(kiln.url + "/metrics", timeout=10).text, re.M), timeout=30)


@pytest.fixture
def docker_proxy(tmp_path: Path, proxy_server: gp.ProxyServer) -> Iterator[ModuleProxyServer]:
    client = docker_client(required=True)
    assert client is not None
    gateway = internal_network(client)
    cache = ModuleCache(store=ModuleStore(objects_of(LocalStore(tmp_path / "store"))),
                        upstream=Upstream(proxy_server.url), checksums=None)
    server = ModuleProxyServer(cache, host=gateway).start()
    try:
        yield server
    finally:
        server.close()


def test_docker_fetch_steps_reach_the_module_proxy_and_not_the_internet(
        docker_proxy: ModuleProxyServer, tmp_path: Path, proxy_dir: Path) -> None:
    image = ensure_sandbox_image()
    client = docker_client(required=True)
    sandbox = docker_sandbox(client, image, tmp_path / "cache", proxy_dir,
                             worker_id=f"modproxy-{threading.get_ident()}", network="bridge",
                             goproxy=docker_proxy.url, fetch_network=MODCACHE_NETWORK)
    builder = Builder(sandbox=sandbox, goproxy=docker_proxy.url, gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS, compile_timeout=COMPILE_TIMEOUT_SECONDS)
    spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO,
                                             version=gp.HELLO_VERSIONS[0]),),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)
    out = builder.build(spec, key=spec.key(), workdir=tmp_path / "work", log=lambda _s, _l: None)
    assert out.binary.is_file()
    assert (tmp_path / "store" / "modcache" / escape_path(gp.HELLO) / "@v"
            / f"{gp.HELLO_VERSIONS[0]}.zip").is_file()

    # the same network, asked for the real module proxy: nothing outside the host answers
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "go.mod").write_text("module probe\n\ngo 1.21\n")
    probe = Step(FETCH, ("go", "mod", "download", "-x", "rsc.io/quote@v1.5.2"),
                 env={"GOPROXY": "https://proxy.golang.org", "GOSUMDB": "off",
                      "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
                 network=True, timeout=120)
    result = sandbox.run(probe, workdir=tmp_path / "probe")
    assert not result.ok
    assert re.search(r"dial tcp|no such host|network is unreachable|server misbehaving|"
                     r"i/o timeout", result.output), result.output


def test_real_caddy_is_fetched_through_the_cache_checked_against_sum_golang_org(
        tmp_path: Path) -> None:
    """Real Caddy's modules from proxy.golang.org, each checked against sum.golang.org."""
    made = Front(upstream=rc.GOPROXY)
    front = ThreadingHTTPServer(("127.0.0.1", 0), front_handler(made))
    made.url = f"http://127.0.0.1:{front.server_address[1]}"
    threading.Thread(target=front.serve_forever, daemon=True).start()
    store = ModuleStore(objects_of(LocalStore(tmp_path / "store")))
    servers: list[ModuleProxyServer] = []

    def fetch(name: str) -> tuple[str, ModuleCache]:
        upstream = Upstream(made.url)
        verifier = parse_gosumdb(rc.GOSUMDB)
        assert verifier is not None
        # lists and not-found answers shared for the whole test (a cold fetch takes minutes)
        cache = ModuleCache(store=store, upstream=upstream, checksums=SumDB(upstream, verifier),
                            list_ttl=3600)
        server = ModuleProxyServer(cache).start()
        servers.append(server)
        sandbox = process_sandbox(tmp_path / f"{name}-cache")
        # the go command checks the checksum database too, through the same proxy
        builder = Builder(sandbox=sandbox, goproxy=server.url, gosumdb=rc.GOSUMDB,
                          fetch_timeout=rc.BUILD_TIMEOUT_SECONDS,
                          compile_timeout=rc.BUILD_TIMEOUT_SECONDS)
        spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version=rc.CADDY_PINNED,
                         plugins=(), replacements=(), go_version=sandbox.go_version(),
                         sandbox=sandbox.identity)
        workdir = tmp_path / name
        builder.fetch(spec, key=spec.key(), workdir=workdir, log=lambda _s, _l: None)
        return (workdir / "go.sum").read_text(), cache

    try:
        go_sum, _ = fetch("first")
        assert f"{rc.CADDY} {rc.CADDY_PINNED} h1:" in go_sum
        caddy_zip = (tmp_path / "store" / "modcache" / rc.CADDY / "@v"
                     / f"{rc.CADDY_PINNED}.zip")
        assert caddy_zip.is_file()
        assert made.counts[f"sumdb/sum.golang.org/lookup/{rc.CADDY}@{rc.CADDY_PINNED}"] >= 1

        first_asked = set(made.counts)
        made.counts.clear()
        again, _ = fetch("second")
        assert again == go_sum
        assert made.modules_asked() == Counter(), "a fresh worker asked upstream for modules"
        # nor for the checksum database's records and tiles, which the go command checks:
        # nothing the first worker asked. Only when the live database's log grew during the
        # first fetch (its newest head, shared, is then past some of the proofs that fetch
        # made) does the second ask the partial tiles at the new head's edge, once each
        grown = re.compile(r"sumdb/[^/]+/tile/\d+/\d+/(x\d+/)*\d+\.p/\d+")
        assert all(grown.fullmatch(path) and path not in first_asked and n == 1
                   for path, n in made.counts.items()), made.counts
    finally:
        for server in servers:
            server.close()
        front.shutdown()
        front.server_close()
