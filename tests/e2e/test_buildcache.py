"""The fleet build cache end to end: real worker processes, and the docker sandbox.

* Two worker processes with separate Go caches share one store (``buildcache.enabled``):
  what the first compiled, the second fetches, counted in ``/metrics``.
* In the docker sandbox, a compile step reaches the cache only through the socket: it
  builds with hits from what another worker shared, and a step that writes the cache's
  directory itself fails, as it is mounted read-only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kiln.buildcache.blobs import DirectoryBlobs
from kiln.buildcache.cache import BuildCache
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import COMPILE, CacheProg, Step
from kiln.worker.sandbox.docker import CACHEPROG_PROGRAM
from tests.dockerutil import ensure_sandbox_image, require_docker
from tests.fixtures import goproxy as gp
from tests.sandboxes import builder as make_builder
from tests.sandboxes import docker_sandbox, readable_proxy
from tests.service import KilnProcesses, wait_for

pytestmark = pytest.mark.slow


# -- two worker processes -------------------------------------------------------------


@pytest.fixture(scope="module")
def kiln_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cold Go caches: the first worker compiles everything."""
    return tmp_path_factory.mktemp("go-a")


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_BUILDCACHE__ENABLED": "true", "KILN_METRICS__FLUSH_SECONDS": "0.2"}


def _start(kiln: KilnProcesses) -> None:
    kiln.start_worker("a")
    kiln.wait_for_worker("a")
    kiln.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Any:
    return _start


def metrics(kiln: KilnProcesses) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(kiln.url + "/metrics", timeout=30)
    assert resp.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_a_second_worker_compiles_with_what_the_first_shared(
        kiln: KilnProcesses, tmp_path: Path) -> None:
    first = kiln.post_build({"os": "linux", "arch": "amd64",
                             "plugins": [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"]}).json()
    assert kiln.wait_build(first["key"], timeout=600)["state"] == "succeeded"
    # the worker shares the entries once the build is marked succeeded, not before
    wait_for("the first build's cache entries published",
             lambda: "build cache: published" in kiln.log("a"))
    store = DirectoryBlobs(kiln.root / "artifacts" / "buildcache")
    shared = [b for b in store.blobs() if b.path.startswith("a/")]
    assert len(shared) > 50  # the first worker's compile, published once it succeeded
    kiln.stop("a")

    # a fresh worker: other Go caches, an empty local build cache, the same store; it
    # builds another version of the plugin on the same Caddy
    kiln.start_worker("b", env={"KILN_BUILD__CACHE_DIR": str(tmp_path / "go-b")})
    kiln.wait_for_worker("b")
    second = kiln.post_build({"os": "linux", "arch": "amd64",
                              "plugins": [f"{gp.HELLO}@{gp.HELLO_VERSIONS[1]}"]}).json()
    assert kiln.wait_build(second["key"], timeout=600)["state"] == "succeeded"

    wait_for("the second build's cache entries published",
             lambda: "build cache: published" in kiln.log("b"))

    def counted() -> dict[str, float]:
        found = metrics(kiln)
        counts = {result: found.get(("kiln_buildcache_gets_total", (("result", result),)), 0)
                  for result in ("store", "miss", "local")}
        counts["published"] = found.get(("kiln_buildcache_published_total", ()), 0)
        return counts

    # the workers add their counts to the shared table every 0.2 s
    gets = wait_for("both workers' counts in /metrics",
                    lambda: (c := counted())["store"] and c["published"] > len(shared) and c)
    # the core and the standard modules came from the store; only the plugin and main
    # were compiled again
    assert gets["store"] > 100, gets


# -- the docker sandbox ---------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from kiln.worker.sandbox.docker_engine import docker_client

    require_docker()
    ensure_sandbox_image()
    engine = docker_client(required=True)
    assert engine is not None
    yield engine
    engine.close()


@pytest.fixture
def sockets() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kiln-bc-") as tmp:
        yield Path(tmp)


def docker_worker(client: Any, root: Path, proxy: Path, store: DirectoryBlobs,
                  sockets: Path, name: str) -> tuple[Builder, BuildCache]:
    sandbox = docker_sandbox(client, ensure_sandbox_image(), root / name / "go", proxy,
                             worker_id=f"kiln-test-buildcache-{name}")
    cache = BuildCache(directory=root / name / "buildcache", store=store,
                       program=Path(CACHEPROG_PROGRAM), socket_dir=sockets / name)
    builder = make_builder(sandbox, proxy)
    builder.buildcache = cache
    return builder, cache


def test_docker_compiles_share_through_the_socket_only(
        client: Any, tmp_path: Path, sockets: Path) -> None:
    proxy = readable_proxy(tmp_path / "proxy")
    store = DirectoryBlobs(tmp_path / "store" / "buildcache")
    a, a_cache = docker_worker(client, tmp_path, proxy, store, sockets, "a")
    spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO,
                                             version=gp.HELLO_VERSIONS[0]),),
                     replacements=(), go_version=a.sandbox.go_version(),
                     sandbox=a.sandbox.identity)
    out = a.build(spec, key=spec.key(), workdir=tmp_path / "work-a", log=lambda _s, _l: None)
    assert out.cache is not None and out.cache.publish() > 50
    assert a_cache.stats["puts"] > 50

    b, b_cache = docker_worker(client, tmp_path, proxy, store, sockets, "b")
    again = b.build(spec, key=spec.key(), workdir=tmp_path / "work-b",
                    log=lambda _s, _l: None)
    assert again.binary.read_bytes() == out.binary.read_bytes()
    # what a compiled came from the store: fetched ahead from a's manifest of this build
    # while b fetched modules, or when go asked
    assert b_cache.stats["store"] + b_cache.stats["prefetched"] > 100, b_cache.stats
    assert b_cache.stats["puts"] * 10 < a_cache.stats["puts"], b_cache.stats
    assert again.cache is not None
    again.cache.discard()

    # a step that writes the cache directory itself is refused: it is mounted read-only,
    # and neither the store nor the worker's own Go build cache is there at all
    session = b_cache.begin("poison")
    try:
        victim = sorted(b_cache.outputs.iterdir())[0]
        before = victim.read_bytes()
        step = Step(COMPILE, ("sh", "-c", f"echo poison > /cache/kiln-outputs/{victim.name}; "
                              "echo poison > /cache/kiln-outputs/new; "
                              f"ls {store.root} {b.sandbox.buildcache}"),  # type: ignore[attr-defined]
                    cacheprog=CacheProg(program=Path(CACHEPROG_PROGRAM), socket=session.socket,
                                        outputs=b_cache.outputs), build_key="poison")
        (tmp_path / "work-poison").mkdir()
        result = b.sandbox.run(step, workdir=tmp_path / "work-poison")
    finally:
        session.discard()
    assert result.exit_code != 0
    assert result.output.count("Read-only file system") == 2, result.output
    assert "No such file or directory" in result.output, result.output
    assert victim.read_bytes() == before
    assert not (b_cache.outputs / "new").exists()
