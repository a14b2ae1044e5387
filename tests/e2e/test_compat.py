"""End to end: caddyserver.com's clients, pointed at Kiln, work unchanged.

Real gunicorn (gthread), a worker process, PostgreSQL and the synthetic module proxy over
HTTP (so branches and commits resolve). The caddy binary's own download code is played by
a small Go program using net/http exactly as ``caddy upgrade`` does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses
from tests.service import template_database as _database

pytestmark = pytest.mark.slow

DNS_ROOT_PACKAGE = gp.DNS  # what `caddy upgrade` sends for the dns plugin: its module path
UNREGISTERED = gp.MIXEDCASE

# A Go client doing what caddy's cmd/packagesfuncs.go downloadBuild + writeCaddyBinary do.
CLIENT_GO = """\
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	resp, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "secure request failed: %v\\n", err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		var details struct {
			StatusCode int `json:"status_code"`
			Error      struct {
				Message string `json:"message"`
				ID      string `json:"id"`
			} `json:"error"`
		}
		if err2 := json.NewDecoder(resp.Body).Decode(&details); err2 != nil {
			fmt.Fprintf(os.Stderr, "download and error decoding failed: HTTP %d: %v\\n", resp.StatusCode, err2)
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "download failed: HTTP %d: %s (id=%s)\\n", resp.StatusCode, details.Error.Message, details.Error.ID)
		os.Exit(3)
	}
	f, err := os.OpenFile(os.Args[2], os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(5)
	}
}
"""


def catalog() -> dict[str, object]:
    """Return an /api/packages document registering the fixture plugins but MixedCase."""
    def entry(path: str, module_id: str | None) -> dict[str, object]:
        modules = [{"name": module_id, "docs": f"{module_id} does things.", "package": path,
                    "repo": f"https://{path}"}] if module_id else []
        return {"id": f"id-{module_id or path}", "path": path, "repo": f"https://{path}",
                "downloads": 7, "listed": True, "available": True,
                "published": "2024-01-01T00:00:00Z", "updated": "2024-02-01T00:00:00Z",
                "modules": modules}
    return {"status_code": 200, "result": [
        entry(gp.HELLO, gp.HELLO_ID),
        entry(gp.DNS_PACKAGE, gp.DNS_ID),
        entry(gp.BROKEN, gp.BROKEN_ID),
        entry(gp.NEEDSNEW, gp.NEEDSNEW_ID),
    ]}


@pytest.fixture(scope="module")
def kiln_goproxy(proxy_server: gp.ProxyServer) -> str:
    return proxy_server.url


@pytest.fixture(scope="module")
def kiln_env(kiln_root: Path) -> dict[str, str]:
    (kiln_root / "catalog.json").write_text(json.dumps(catalog()))
    return {
        "KILN_PLUGINS__CATALOG_FILE": str(kiln_root / "catalog.json"),
        "KILN_PLUGINS__ALLOW": "registered",
        "KILN_PLUGINS__CATALOG_TTL": "0",
        # the concurrency test holds 100 downloads from one client (start_wide_api's threads)
        "KILN_API__THREADS": "128",
        "KILN_API__MAX_HELD": "120",
        "KILN_API__MAX_HELD_PER_CLIENT": "120",
    }


def start_wide_api(service: KilnProcesses) -> None:
    """Start a worker, then an API with more threads than the concurrency test holds requests."""
    service.start_worker()
    service.wait_for_worker()
    service.start_api(threads=128)


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_wide_api


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory, go_cache_dir: Path) -> Path:
    """Build the caddy-like download client once for the module."""
    src = tmp_path_factory.mktemp("goclient")
    (src / "go.mod").write_text("module kilntest/download\n\ngo 1.21\n")
    (src / "main.go").write_text(CLIENT_GO)
    env = gp.go_env("off", go_cache_dir)
    subprocess.run([str(gp.find_go()), "build", "-o", "download", "."], cwd=src, env=env,
                   check=True, capture_output=True, timeout=300)
    return src / "download"


def download_url(kiln: KilnProcesses, path: str = "/api/download", **params: object) -> str:
    pairs: list[tuple[str, object]] = []
    for name, value in params.items():
        pairs += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    return f"{kiln.url}{path}?{urllib.parse.urlencode(pairs)}"


def run_client(client: Path, url: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(client), url, str(dest)], capture_output=True, text=True,
                          timeout=300)


def caddy(binary: Path, *args: str) -> str:
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def plugin_modules(binary: Path) -> dict[str, str]:
    found = {}
    for line in caddy(binary, "list-modules", "--versions", "--skip-standard").splitlines():
        parts = line.split()
        if len(parts) == 2 and "." in parts[0]:
            found[parts[0]] = parts[1]
    return found


def count(kiln: KilnProcesses, sql: str, params: tuple[object, ...] = ()) -> int:
    with psycopg.connect(kiln.env["KILN_DATABASE__URL"]) as conn:
        return int(conn.execute(sql, params).fetchone()[0])  # type: ignore[index]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def worker_paused(kiln: KilnProcesses) -> Iterator[None]:
    """Freeze the worker (SIGSTOP), so builds stay queued while requests are held."""
    pid = kiln.procs["worker"].pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def assert_error(resp: requests.Response, status: int, *fragments: str) -> dict[str, object]:
    """Check the caddyserver.com error shape, its status and that its id is in the log."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status_code"] == status
    error = body["error"]
    assert set(error) <= {"message", "id", "field"}
    assert error["id"] == resp.headers["X-Request-Id"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------


def test_caddy_upgrade_client_gets_a_runnable_binary(kiln: KilnProcesses, go_client: Path,
                                                      tmp_path: Path) -> None:
    # caddy upgrade sends module paths with the versions its build info holds; the dns
    # plugin's module root registers nothing, its catalog package does
    url = download_url(kiln, os="linux", arch="amd64",
                       p=[f"{gp.HELLO}@v0.1.0", f"{DNS_ROOT_PACKAGE}@v2.0.0"])
    result = run_client(go_client, url, tmp_path / "caddy")
    assert result.returncode == 0, result.stderr + kiln.log("worker")[-3000:]
    assert plugin_modules(tmp_path / "caddy") == {gp.HELLO_ID: "v0.1.0", gp.DNS_ID: "v2.0.0"}
    assert caddy(tmp_path / "caddy", "version").startswith(gp.CADDY_LATEST)


def test_caddy_client_shows_the_error_message(kiln: KilnProcesses, go_client: Path,
                                              tmp_path: Path) -> None:
    url = download_url(kiln, os="linux", arch="amd64", p=[gp.HELLO, UNREGISTERED])
    result = run_client(go_client, url, tmp_path / "caddy")
    assert result.returncode == 3, result.stderr
    match = re.fullmatch(r"download failed: HTTP 400: (.*) \(id=([0-9a-f-]{36})\)\n",
                         result.stderr, re.S)
    assert match, result.stderr
    assert match[1].startswith(f"{UNREGISTERED} is not a registered Caddy module package path")
    assert match[2] in kiln.log("api")
    assert not (tmp_path / "caddy").exists()


def test_website_heads_then_navigates_to_location(kiln: KilnProcesses, tmp_path: Path) -> None:
    url = download_url(kiln, os="linux", arch="amd64", p=[gp.HELLO], idempotency=4242)
    head = requests.head(url, timeout=300)
    assert head.status_code == 200, head.text
    assert head.content == b""
    location = head.headers["Location"]
    key = head.headers["X-Kiln-Build-Key"]
    assert location == f"/api/builds/{key}/artifact"
    got = requests.get(urllib.parse.urljoin(kiln.url, location), timeout=60)
    assert got.status_code == 200
    assert got.headers["Content-Disposition"] == 'attachment; filename="caddy_linux_amd64_custom"'
    assert int(head.headers["Content-Length"]) == len(got.content)
    (tmp_path / "caddy").write_bytes(got.content)
    assert plugin_modules(tmp_path / "caddy") == {gp.HELLO_ID: gp.HELLO_LATEST}
    # a plain GET of the same download answers with the same bytes at once
    again = requests.get(url, timeout=60)
    assert again.status_code == 200 and again.content == got.content
    assert again.headers["Content-Type"] == "application/octet-stream"
    assert again.headers["Cache-Control"] == "no-store"


def test_compat_endpoint_with_a_replacement_and_a_branch(kiln: KilnProcesses,
                                                         tmp_path: Path) -> None:
    # seed 000's form: /api/compat with r=old=new@version; core at a branch name
    url = download_url(kiln, "/api/compat", os="linux", arch="amd64", version=gp.MASTER_BRANCH,
                       p=[f"{gp.HELLO}@v0.2.0"], r=[f"{gp.HELLO}@v0.2.0={gp.HELLO}@v0.1.0"])
    resp = requests.get(url, timeout=300)
    assert resp.status_code == 200, resp.text + kiln.log("worker")[-3000:]
    assert resp.headers["Content-Disposition"].endswith('filename="caddy_linux_amd64_custom"')
    (tmp_path / "caddy").write_bytes(resp.content)
    assert caddy(tmp_path / "caddy", "version").startswith(gp.MASTER_PSEUDO)
    info = caddy(tmp_path / "caddy", "build-info")
    assert re.search(rf"^=>\s+{re.escape(gp.HELLO)}\s+v0\.1\.0\s", info, re.M), info


def test_100_held_identical_requests_make_one_build(kiln: KilnProcesses) -> None:
    url = download_url(kiln, os="linux", arch="386", p=[f"{gp.HELLO}@v0.2.0"])
    before = kiln.log("api").count("holding GET /api/download for build")
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        with worker_paused(kiln):
            futures = [pool.submit(requests.get, url, timeout=300) for _ in range(100)]
            # every request is held (the worker is frozen) before the build may start
            wait_for(lambda: kiln.log("api").count("holding GET /api/download for build")
                     - before >= 100, 60, "100 held requests")
            assert not any(f.done() for f in futures)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 100, responses[0].text
    digests = {hashlib.sha256(r.content).hexdigest() for r in responses}
    assert len(digests) == 1
    key = responses[0].headers["X-Kiln-Build-Key"]
    assert {r.headers["X-Kiln-Build-Key"] for r in responses} == {key}
    assert count(kiln, "SELECT count(*) FROM kiln_attempts WHERE build_key = %s", (key,)) == 1
    assert count(kiln, "SELECT downloads FROM kiln_builds WHERE key = %s", (key,)) == 100


def test_a_client_that_disconnects_is_let_go_at_once(kiln: KilnProcesses) -> None:
    url = download_url(kiln, os="linux", arch="arm", arm="6", p=[gp.HELLO])
    target = urllib.parse.urlsplit(url)
    held = kiln.log("api").count("holding GET /api/download for build")
    with worker_paused(kiln):
        with socket.create_connection(("127.0.0.1", kiln.port)) as conn:
            conn.sendall(f"GET {target.path}?{target.query} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\n\r\n".encode())
            wait_for(lambda: kiln.log("api").count("holding GET /api/download") > held, 30,
                     "the request to be held")
        # the socket is closed: the server must notice and let go within a tick or two
        wait_for(lambda: "client went away" in kiln.log("api"), 5, "the server to notice")
    line = next(x for x in kiln.log("api").splitlines() if "client went away" in x)
    assert "holds 0 requests with 0 subscriptions" in line, line


def test_error_paths_answer_in_caddyserver_shape(kiln: KilnProcesses) -> None:
    get = lambda **params: requests.get(download_url(kiln, **params), timeout=300)  # noqa: E731
    assert_error(get(arch="amd64"), 400, "os is required")
    assert_error(get(os="plan9", arch="amd64"), 400, "unsupported platform")
    assert_error(get(os="linux", arch="amd64", plugin=gp.HELLO), 400, "unknown parameter 'plugin'")
    err = assert_error(get(os="linux", arch="amd64", p="github.com/x/y;reboot"), 400)
    assert err["field"] == "p"
    assert_error(get(os="linux", arch="amd64", version="v2.8.0", caddy_version="v2.8.4"), 400,
                 "disagree")
    assert_error(get(os="linux", arch="amd64", p=f"https://{UNREGISTERED}"), 400,
                 f"{UNREGISTERED} is not a registered Caddy module package path")
    assert_error(get(os="linux", arch="amd64", p=f"{gp.HELLO}@v9.9.9"), 400, "v9.9.9")
    assert_error(get(os="linux", arch="amd64", p=gp.BROKEN), 400, "build failed", "cannot use")
    assert_error(get(os="linux", arch="amd64", version=gp.CADDY_OLDEST, p=gp.NEEDSNEW), 400,
                 "build failed", gp.NEEDSNEW_REQUIRES)
    head = requests.head(download_url(kiln, os="linux", arch="amd64", p=gp.BROKEN), timeout=60)
    assert head.status_code == 400 and "Location" not in head.headers


def test_registered_only_refuses_paths_that_only_look_registered(kiln: KilnProcesses) -> None:
    # github.com/v2 is another GitHub user: its /v2 is not a major version of gp.HELLO
    elsewhere = gp.HELLO.replace("github.com/", "github.com/v2/")
    owner = elsewhere.rsplit("/", 1)[0]
    builds = count(kiln, "SELECT count(*) FROM kiln_builds")
    post = lambda body: requests.post(f"{kiln.url}/api/builds", timeout=60,  # noqa: E731
                                      json={"os": "linux", "arch": "amd64", **body})
    err = assert_error(post({"plugins": [elsewhere]}), 400,
                       f"{elsewhere} is not a registered Caddy module package path",
                       "GET /api/packages")
    assert err["field"] == "plugins[0]"
    err = assert_error(post({"plugins": [gp.HELLO], "replacements": [f"{gp.HELLO}={owner}@v0.1.0"]}),
                       400, f"{owner} is not a registered Caddy module package path")
    assert err["field"] == "replacements[0]"
    assert count(kiln, "SELECT count(*) FROM kiln_builds") == builds


def test_packages_in_caddyserver_shape(kiln: KilnProcesses) -> None:
    resp = requests.get(kiln.url + "/api/packages", timeout=30)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status_code"] == 200
    by_path = {p["path"]: p for p in body["result"]}
    assert set(by_path) == {gp.HELLO, gp.DNS_PACKAGE, gp.BROKEN, gp.NEEDSNEW}
    for package in body["result"]:
        assert set(package) == {"id", "path", "repo", "downloads", "listed", "available",
                                "published", "updated", "modules"}
        for module in package["modules"]:
            assert set(module) == {"name", "docs", "package", "repo"}
    assert by_path[gp.DNS_PACKAGE]["modules"][0]["name"] == gp.DNS_ID
    # Kiln's own downloads are added to the catalog's count (7) once its builds are fetched
    requests.get(download_url(kiln, os="linux", arch="amd64", p=gp.HELLO), timeout=300)
    hello = {p["path"]: p for p in requests.get(kiln.url + "/api/packages",
                                                timeout=30).json()["result"]}[gp.HELLO]
    assert hello["downloads"] > 7


def test_versions_lists_caddy_newest_first(kiln: KilnProcesses) -> None:
    body = requests.get(kiln.url + "/api/versions", timeout=30).json()
    assert body["status_code"] == 200
    assert body["result"]["latest"] == gp.CADDY_LATEST
    assert body["result"]["versions"] == list(reversed(gp.CADDY_VERSIONS))
    hello = requests.get(kiln.url + f"/api/versions?module={gp.HELLO}", timeout=30).json()
    assert hello["result"]["versions"] == list(reversed(gp.HELLO_VERSIONS))
    assert_error(requests.get(kiln.url + "/api/versions?module=github.com/kiln-fixtures/none",
                              timeout=30), 404, "github.com/kiln-fixtures/none")


# --------------------------------------------------------------------------------------
# When nothing can build: no live worker, or a build that outlasts api.max_wait


@pytest.fixture(scope="module")
def idle_kiln(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
              proxy_server: gp.ProxyServer, go_cache_dir: Path,
              kiln: KilnProcesses) -> Iterator[KilnProcesses]:
    """An API whose database knows one worker and has no worker process at all."""
    root = tmp_path_factory.mktemp("compat-idle")
    url = _database(pg_server_url, pg_template, "kiln_compat_idle")
    with psycopg.connect(url, autocommit=True) as conn:
        # a worker that registered (so builds can be keyed) but runs nowhere
        conn.execute(
            "INSERT INTO kiln_workers (id, hostname, pid, concurrency, sandbox, go_version) "
            "VALUES ('phantom', 'nowhere', 1, 1, 'process', 'go1.25.0')")
    service = KilnProcesses(db_url=url, root=root, goproxy=proxy_server.url,
                            cache_dir=go_cache_dir, env={"KILN_API__MAX_WAIT": "2",
                                                         "KILN_API__WORKER_WAIT": "0"})
    try:
        service.start_api()
        yield service
    finally:
        service.close()


def test_no_live_worker_is_502_and_a_long_build_is_504(idle_kiln: KilnProcesses) -> None:
    url = download_url(idle_kiln, os="linux", arch="amd64", p=gp.HELLO)
    # the phantom worker has a fresh heartbeat: the build is awaited until api.max_wait
    assert_error(requests.get(url, timeout=60), 504, "still queued", "ask again later")
    with psycopg.connect(idle_kiln.env["KILN_DATABASE__URL"], autocommit=True) as conn:
        conn.execute("UPDATE kiln_workers SET state = 'gone'")
    time.sleep(2.5)  # the API's live-worker count is reused for two seconds
    assert_error(requests.get(url, timeout=60), 502, "no build worker is running")
    assert requests.head(url, timeout=60).status_code == 502


def test_the_gevent_worker_holds_and_lets_go_too(kiln: KilnProcesses,
                                                 tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    pytest.importorskip("gevent")
    other = KilnProcesses(db_url=kiln.env["KILN_DATABASE__URL"],
                          root=tmp_path_factory.mktemp("compat-gevent"),
                          goproxy=kiln.env["KILN_BUILD__GOPROXY"],
                          cache_dir=Path(kiln.env["KILN_BUILD__CACHE_DIR"]),
                          env={k: v for k, v in kiln.env.items()
                               if k.startswith(("KILN_PLUGINS", "KILN_STORAGE"))})
    try:
        other.start_api(worker_class="gevent")
        url = download_url(other, os="linux", arch="arm64", p=f"{gp.HELLO}@v0.1.0")
        target = urllib.parse.urlsplit(url)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with worker_paused(kiln):
                held = pool.submit(requests.get, url, timeout=300)
                with socket.create_connection(("127.0.0.1", other.port)) as conn:
                    conn.sendall(f"GET {target.path}?{target.query} HTTP/1.1\r\n"
                                 f"Host: 127.0.0.1\r\n\r\n".encode())
                    wait_for(lambda: other.log("api").count("holding GET") >= 2, 30,
                             "two held requests")
                wait_for(lambda: "client went away" in other.log("api"), 5,
                         "the server to notice")
                assert not held.done()
            resp = held.result()
        assert resp.status_code == 200, resp.text
        assert "holds 1 requests with 1 subscriptions" in other.log("api")
        assert resp.content[:4] == b"\x7fELF"
    finally:
        other.close()
