"""Real Caddy, real plugins, the real Go module proxy: through the API, a worker and both
sandboxes, compared byte for byte with xcaddy v0.4.5 run with the same Go.

What a user would check: the resolved "latest" is the newest Caddy the proxy serves, the
binary says that version, lists the plugins' modules at the asked versions, serves HTTP on
127.0.0.1 with a plugin doing its job, and is the very file xcaddy builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import binfmt
from tests import realcaddy as rc
from tests.dockerutil import ensure_sandbox_image
from tests.service import KilnProcesses, free_port, template_database

pytestmark = pytest.mark.slow

PLUGINS = (rc.CLOUDFLARE, rc.RATELIMIT, rc.L4TLS)
REAL_ENV = {"KILN_BUILD__GOSUMDB": rc.GOSUMDB, "KILN_WORKER__LEASE_SECONDS": "30"}
"""Settings of a Kiln building from the real module proxy, checked by the checksum database."""


def real_kiln(root: Path, db_url: str, cache_dir: Path,
              env: dict[str, str] | None = None) -> KilnProcesses:
    """Return a Kiln configured for the real module proxy and checksum database."""
    return KilnProcesses(db_url=db_url, root=root, goproxy=rc.GOPROXY, cache_dir=cache_dir,
                         env={**REAL_ENV, **(env or {})})


@pytest.fixture(scope="module")
def kiln_goproxy() -> str:
    return rc.GOPROXY


@pytest.fixture(scope="module")
def kiln_cache_dir(real_cache_dir: Path) -> Path:
    return real_cache_dir


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return REAL_ENV


@pytest.fixture(scope="module")
def newest() -> str:
    return rc.newest_caddy()


def build(kiln: KilnProcesses, body: dict[str, Any]) -> dict[str, Any]:
    """POST a build and wait for its final state."""
    resp = kiln.post_build(body)
    assert resp.status_code in (200, 202), resp.text
    return kiln.wait_build(resp.json()["key"], timeout=rc.BUILD_TIMEOUT_SECONDS)



def run(binary: Path, *args: str) -> str:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def listed_modules(binary: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in run(binary, "list-modules", "--versions").splitlines():
        parts = line.split()
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return found


@contextlib.contextmanager
def caddy_running(binary: Path, workdir: Path, caddyfile: str) -> Iterator[str]:
    """Run ``caddy run`` with a Caddyfile whose site is ``http://127.0.0.1:{port}``."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "Caddyfile"
    config.write_text(caddyfile.replace("{port}", str(port)))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir),
           "XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "config")}
    log = (workdir / "caddy.log").open("wb")
    proc = subprocess.Popen([str(binary), "run", "--config", str(config), "--adapter",
                             "caddyfile"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, (workdir / "caddy.log").read_text()
                assert time.monotonic() < deadline, (workdir / "caddy.log").read_text()
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log.close()


#: a site that answers, behind the rate_limit handler of caddy-ratelimit: two requests a
#: minute, the third is refused, which only a binary with the plugin can do
RATE_LIMITED_SITE = """{
	admin off
}
http://127.0.0.1:{port} {
	route {
		rate_limit {
			zone kiln_test {
				key static
				events 2
				window 1m
			}
		}
		respond "hello from a Kiln-built Caddy"
	}
}
"""


@pytest.fixture(scope="module")
def latest_build(kiln: KilnProcesses, newest: str,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Caddy "latest" with three real plugins, one asked by a package inside its module."""
    doc = build(kiln, {"os": "linux", "arch": "amd64", "plugins": [rc.pin(p) for p in PLUGINS]})
    assert doc["state"] == "succeeded", (doc, kiln.log("worker")[-4000:])
    return doc, kiln.download(doc, tmp_path_factory.mktemp("latest") / "caddy")


def test_latest_resolves_to_the_newest_release_and_the_binary_serves(
        latest_build: tuple[dict[str, Any], Path], newest: str, tmp_path: Path) -> None:
    doc, binary = latest_build
    assert doc["caddy_version"] == newest
    assert {p["package"]: (p["module"], p["version"]) for p in doc["plugins"]} == {
        p[0]: (p[1], p[2]) for p in PLUGINS}
    assert run(binary, "version").split()[0] == newest
    modules = listed_modules(binary)
    for plugin in PLUGINS:
        assert modules.get(plugin[3]) == plugin[2], (plugin, modules)
    with caddy_running(binary, tmp_path / "site", RATE_LIMITED_SITE) as url:
        first = requests.get(url, timeout=10)
        assert (first.status_code, first.text) == (200, "hello from a Kiln-built Caddy")
        requests.get(url, timeout=10)
        assert requests.get(url, timeout=10).status_code == 429


def test_same_bytes_as_xcaddy(latest_build: tuple[dict[str, Any], Path], real_cache_dir: Path,
                              tmp_path: Path) -> None:
    doc, binary = latest_build
    # Kiln imports plugins in package order, whatever order they were asked in (one key,
    # one binary per set); xcaddy imports them in the order of its --with flags
    packages = sorted(f"{p['package']}@{p['version']}" for p in doc["plugins"])
    reference = rc.xcaddy_build(real_cache_dir, tmp_path, caddy_version=doc["caddy_version"],
                                packages=packages)
    assert rc.go_version_m(binary) == rc.go_version_m(reference)
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == \
        hashlib.sha256(reference.read_bytes()).hexdigest()


def test_pinned_caddy_cross_compiled_for_arm64_matches_xcaddy(
        kiln: KilnProcesses, real_cache_dir: Path, tmp_path: Path) -> None:
    doc = build(kiln, {"os": "linux", "arch": "arm64", "caddy_version": rc.CADDY_PINNED,
                       "plugins": [rc.pin(rc.CLOUDFLARE)]})
    assert doc["state"] == "succeeded", (doc, kiln.log("worker")[-4000:])
    binary = kiln.download(doc, tmp_path / "caddy-arm64")
    data = binary.read_bytes()
    assert binfmt.inspect(data).arch == "arm64"
    info = rc.go_version_m(binary)
    assert f"dep\t{rc.CADDY}\t{rc.CADDY_PINNED}\t" in info
    assert f"dep\t{rc.CLOUDFLARE[1]}\t{rc.CLOUDFLARE[2]}\t" in info
    assert "build\tGOARCH=arm64" in info
    reference = rc.xcaddy_build(real_cache_dir, tmp_path, caddy_version=rc.CADDY_PINNED,
                                packages=[rc.pin(rc.CLOUDFLARE)], goarch="arm64")
    assert data == reference.read_bytes()


def test_a_plugin_needing_a_newer_caddy_names_both_versions(kiln: KilnProcesses) -> None:
    doc = build(kiln, {"os": "linux", "arch": "amd64", "caddy_version": rc.CADDY_PINNED,
                       "plugins": [rc.pin(rc.L4TLS)]})
    assert doc["state"] == "failed", doc
    assert rc.L4_NEEDS_CADDY in doc["error"] and rc.CADDY_PINNED in doc["error"], doc["error"]
    assert rc.L4TLS[1] in doc["error"]


# -- the docker sandbox ------------------------------------------------------------------


@pytest.mark.docker
def test_docker_sandbox_builds_the_same_bytes(
        latest_build: tuple[dict[str, Any], Path], tmp_path: Path, pg_server_url: str,
        pg_template: str, real_cache_dir: Path) -> None:
    image = ensure_sandbox_image()
    doc, process_binary = latest_build
    url = template_database(pg_server_url, pg_template, "kiln_real_caddy_docker")
    service = real_kiln(tmp_path / "kiln", url, real_cache_dir, env={
        "KILN_BUILD__SANDBOX": "docker", "KILN_BUILD__DOCKER__IMAGE": image,
        # the fetch container reaches the proxy over the bridge; compile has no network
        "KILN_BUILD__DOCKER__NETWORK": "bridge"})
    with service.running():
        docker_doc = build(service, {"os": "linux", "arch": "amd64",
                                     "caddy_version": doc["caddy_version"],
                                     "plugins": [rc.pin(p) for p in PLUGINS]})
        assert docker_doc["state"] == "succeeded", (docker_doc,
                                                    service.log("worker")[-4000:])
        assert docker_doc["sandbox"].startswith("docker:")
        binary = service.download(docker_doc, tmp_path / "caddy-docker")
    assert binary.read_bytes() == process_binary.read_bytes()
    assert run(binary, "version").split()[0] == doc["caddy_version"]


def test_an_unpinned_plugin_the_proxy_lists_no_versions_of_gets_a_400_asking_for_a_pin(
        kiln: KilnProcesses) -> None:
    module = rc.CLOUDFLARE[1]
    try:
        urllib.request.urlopen(f"{rc.GOPROXY}/{module}/@v/list", timeout=30).close()
        pytest.skip(f"the proxy lists {module}'s versions here")
    except urllib.error.HTTPError as exc:
        assert exc.code == 403, exc
    resp = kiln.post_build({"os": "linux", "arch": "amd64", "plugins": [module]})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "403" in message and f"{module}@vX.Y.Z" in message, message
    # the caddyserver.com endpoint the caddy binary calls says the same, with a 4xx
    compat = requests.get(f"{kiln.url}/api/download", params={
        "os": "linux", "arch": "amd64", "p": module}, timeout=60)
    assert compat.status_code == 400, compat.text
    assert f"{module}@vX.Y.Z" in compat.json()["error"]["message"]
