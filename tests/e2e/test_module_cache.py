"""A warm build asks the module proxy nothing: the fetch steps read the module cache first.

go get, even with every module cached, asks the proxy for each module's version list; Kiln
runs each fetch step with GOPROXY=off first and asks the proxy only for what is missing.
Real Go, the process sandbox, the synthetic proxy over HTTP (which counts its requests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from tests.fixtures import goproxy as gp
from tests.sandboxes import COMPILE_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS, process_sandbox

pytestmark = pytest.mark.slow


def test_warm_fetches_skip_the_proxy_and_a_new_version_is_fetched(
        proxy_server: gp.ProxyServer, tmp_path: Path) -> None:
    sandbox = process_sandbox(tmp_path / "cache")
    builder = Builder(sandbox=sandbox, goproxy=proxy_server.url, gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS,
                      compile_timeout=COMPILE_TIMEOUT_SECONDS)

    def build(hello: str, name: str) -> tuple[bytes, list[str], int]:
        spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                         plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO,
                                                 version=hello),),
                         replacements=(), go_version=sandbox.go_version(),
                         sandbox=sandbox.identity)
        lines: list[str] = []
        before = proxy_server.total
        out = builder.build(spec, key=spec.key(), workdir=tmp_path / name,
                            log=lambda _step, line: lines.append(line))
        return out.binary.read_bytes(), lines, proxy_server.total - before

    first, log, asked = build(gp.HELLO_VERSIONS[0], "cold")
    assert asked > 0
    # a cold cache: each step missed the cache and ran again with the proxy
    assert any(line.endswith("(module cache only)") for line in log)
    assert any(line.startswith("$ go get") and "module cache" not in line for line in log)

    again, log, asked = build(gp.HELLO_VERSIONS[0], "warm")
    assert asked == 0, proxy_server.requests()
    assert again == first
    assert all(line.endswith("(module cache only)") for line in log
               if line.startswith(("$ go get", "$ go mod")))

    # one plugin's version changed: only that is fetched, and the build has it
    changed, _log, asked = build(gp.HELLO_VERSIONS[1], "rebuild")
    assert asked > 0
    assert changed != first
    assert gp.HELLO_VERSIONS[1].encode() in changed


TIDY = "github.com/kiln-fixtures/tidyneeds"


def test_what_only_go_mod_tidy_needs_is_fetched_too(tmp_path: Path) -> None:
    """go mod tidy -e exits 0 when it could not look a module up: that is a miss as well."""
    root = gp.generate(tmp_path / "proxy")
    # a plugin whose test imports a module the build itself never needs: go get leaves
    # its zip alone, and only go mod tidy (which follows test imports) must fetch it
    gp.publish(root, TIDY, "v0.1.0", files={
        "go.mod": (f"module {TIDY}\n\ngo {gp.GO_DIRECTIVE}\n\nrequire (\n"
                   f"\t{gp.CADDY} {gp.CADDY_OLDEST}\n\t{gp.UTIL} {gp.UTIL_VERSION}\n)\n"),
        "tidy.go": "package tidyneeds\n",
        "tidy_test.go": (f'package tidyneeds\n\nimport (\n\t"testing"\n\n\t"{gp.UTIL}"\n)\n\n'
                         'func TestGreeting(t *testing.T) { _ = util.Greeting("x") }\n'),
    })
    sandbox = process_sandbox(tmp_path / "cache")
    builder = Builder(sandbox=sandbox, goproxy=f"file://{root}", gosumdb="off",
                      fetch_timeout=FETCH_TIMEOUT_SECONDS,
                      compile_timeout=COMPILE_TIMEOUT_SECONDS)
    spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version=gp.CADDY_LATEST,
                     plugins=(ResolvedPlugin(package=TIDY, module=TIDY, version="v0.1.0"),),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)
    lines: list[str] = []
    out = builder.build(spec, key=spec.key(), workdir=tmp_path / "work",
                        log=lambda _step, line: lines.append(line))
    assert "$ go mod tidy -e" in lines, lines  # run again with the proxy
    assert f"{gp.UTIL} {gp.UTIL_VERSION} h1:" in out.go_sum
