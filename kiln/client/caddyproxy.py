"""``kiln caddy-proxy``: existing ``caddy`` binaries' add-package, remove-package and upgrade,
served by Kiln.

The caddy binary asks the constant URL https://caddyserver.com/api/download with Go's default
HTTP client, which honours ``HTTPS_PROXY`` and, on Linux, ``SSL_CERT_FILE``. This proxy
answers ``CONNECT caddyserver.com:443`` and nothing else, terminates TLS with a
caddyserver.com certificate issued by a CA it keeps in ``--ca-dir`` (the file clients get as
``SSL_CERT_FILE``), and forwards caddyserver.com's API requests to Kiln, adding the API key
the caddy binary cannot send.

A held download is forwarded with no read timeout: Kiln answers when the build is done, and
the caddy client waits as long. While it waits, the proxy watches the client's socket and
drops the request to Kiln when the client goes away, so Kiln lets go of it too.

One thread per client connection, at most ``--max-connections`` of them; a connection over
the limit is answered ``503`` at once.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import logging
import os
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from kiln.client.certs import TARGET_HOST, CaddyProxyError, ensure_certificates, server_context

log = logging.getLogger("kiln.caddyproxy")

TARGET_PORT = 443
#: caddyserver.com's API paths that Kiln serves (kiln/api/compat.py)
FORWARDED_PATHS = ("/api/download", "/api/packages", "/api/versions")
DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_CA_DIR = "var/caddy-proxy"
#: client connections served at once; each held download keeps one
MAX_CONNECTIONS = 64
#: seconds a client may take to send its CONNECT request and finish the TLS handshake
HEAD_TIMEOUT_SECONDS = 30.0
#: seconds a tunnel may sit idle between requests, or a client may stall a response
IDLE_TIMEOUT_SECONDS = 120.0
#: seconds to connect to Kiln (or to the store it redirects to); reading has no limit
CONNECT_TIMEOUT_SECONDS = 10.0
#: redirects followed for the client (Kiln's redirect-and-wait allows up to 50, plus the store)
MAX_REDIRECTS = 60
#: bytes read from Kiln per call while streaming a response
CHUNK_BYTES = 256 * 1024
#: exit code when the proxy cannot start (bad arguments, unreadable CA, port taken)
EXIT_USAGE = 2

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})


# -- certificates ------------------------------------------------------------------------


# -- the proxy ---------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed the tunnel while its request was held."""


def caddy_error(status: int, message: str) -> bytes:
    """Return an error body in caddyserver.com's shape, which the caddy binary shows."""
    return json.dumps({"status_code": status, "error": {"message": message, "id": ""}}).encode()


def parse_listen(value: str) -> tuple[str, int]:
    """Read ``HOST:PORT`` (``[::1]:8443`` for IPv6); raise CaddyProxyError if it is not."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CaddyProxyError(f"--listen {value!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    return host, int(port)


class CaddyProxy(socketserver.ThreadingTCPServer):
    """The proxy server: tunnels CONNECT caddyserver.com:443 into a forward to Kiln."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, listen: tuple[str, int], *, server_url: str, tls: ssl.SSLContext,
                 api_key: str = "", max_connections: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT_SECONDS,
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        upstream = urllib.parse.urlsplit(server_url)
        if upstream.scheme not in ("http", "https") or not upstream.hostname:
            raise CaddyProxyError(f"--server {server_url!r} is not an http(s):// URL")
        if max_connections < 1:
            raise CaddyProxyError("--max-connections must be at least 1")
        self.server_url = server_url.rstrip("/")
        self.origin = (upstream.scheme, upstream.netloc.lower())
        self.tls = tls
        self.api_key = api_key
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        try:
            super().__init__(listen, _TunnelHandler)
        except OSError as exc:
            raise CaddyProxyError(f"cannot listen on {listen[0]}:{listen[1]}: {exc}") from None

    @property
    def port(self) -> int:
        """Return the port the proxy listens on."""
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread, or answer 503 when every slot is taken."""
        if not self.slots.acquire(blocking=False):
            log.warning("refused %s: %d connections are open already (--max-connections)",
                        client_address[0], self.max_connections)
            body = (f"kiln caddy-proxy serves {self.max_connections} connections at once; "
                    "try again later\n").encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain"
                                b"\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a connection that broke as one line; anything else with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("connection from %s ended: %s", client_address[0], exc)
        else:
            log.exception("error serving %s", client_address[0])

    def upstream(self, url: str) -> http.client.HTTPConnection:
        """Return an unconnected HTTP(S) connection to ``url``'s origin."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "", parts.port, timeout=self.connect_timeout)

    def is_kiln(self, url: str) -> bool:
        """Report whether ``url`` is on Kiln's origin (the only one that gets the API key)."""
        parts = urllib.parse.urlsplit(url)
        return (parts.scheme, parts.netloc.lower()) == self.origin


class _Handler(http.server.BaseHTTPRequestHandler):
    """Common parts of both handlers: logging through ``log``, plain refusals."""

    server: CaddyProxy
    server_version = "kiln-caddy-proxy"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s: " + format, self.client_address[0], *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # forwarded requests are logged once, with their duration and size

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        """Answer with ``body`` and close the connection."""
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _TunnelHandler(_Handler):
    """The proxy protocol: CONNECT caddyserver.com:443 opens a tunnel; the rest is refused."""

    protocol_version = "HTTP/1.1"
    #: unbuffered: the TLS handshake follows the CONNECT request on the same socket, and a
    #: read-ahead buffer could swallow its first bytes
    rbufsize = 0

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.head_timeout)

    def do_CONNECT(self) -> None:  # noqa: N802
        host, _, port = self.path.rpartition(":")
        if host.strip("[]").lower() != TARGET_HOST or port != str(TARGET_PORT):
            log.warning("refused CONNECT %s from %s: not %s:%d", self.path,
                        self.client_address[0], TARGET_HOST, TARGET_PORT)
            self.reply(403, f"kiln caddy-proxy only tunnels to {TARGET_HOST}:{TARGET_PORT} "
                            f"(forwarded to Kiln); CONNECT {self.path} is refused: this is "
                            "not an open proxy\n".encode(), "text/plain; charset=utf-8")
            return
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.close_connection = True
        try:
            tunnel = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake with %s failed: %s (was the client given SSL_CERT_FILE="
                        "<--ca-dir>/ca.pem?)", self.client_address[0], exc)
            return
        try:
            _ApiHandler(tunnel, self.client_address, self.server)
        finally:
            tunnel.close()

    def _not_a_tunnel(self) -> None:
        log.warning("refused %s %s from %s: not a CONNECT", self.command, self.path,
                    self.client_address[0])
        self.reply(403, f"kiln caddy-proxy only tunnels CONNECT {TARGET_HOST}:{TARGET_PORT}; "
                        f"{self.command} requests are refused: this is not an open "
                        "proxy\n".encode(), "text/plain; charset=utf-8")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_a_tunnel


class _ApiHandler(_Handler):
    """Requests inside the tunnel: caddyserver.com's API paths, forwarded to Kiln."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def error(self, status: int, message: str) -> None:
        """Answer in caddyserver.com's error shape and close."""
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self.reply(status, caddy_error(status, message), "application/json")

    def do_GET(self) -> None:  # noqa: N802
        path, _, query = self.path.partition("?")
        if path not in FORWARDED_PATHS:
            self.error(404, f"kiln caddy-proxy forwards only {', '.join(FORWARDED_PATHS)} "
                            f"to Kiln, not {path}")
            return
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length",
                                                                     "0") != "0":
            self.error(400, f"{self.command} {path} takes no request body")
            return
        url = f"{self.server.server_url}{path}" + (f"?{query}" if query else "")
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP | {"host", "authorization", "x-forwarded-for"}}
        headers["X-Forwarded-For"] = self.client_address[0]
        headers["X-Forwarded-Proto"] = "https"
        started = time.monotonic()
        try:
            conn, resp = self._open(url, headers)
        except _ClientGone:
            log.info("%s %s: the client went away after %.1fs; dropped the request to Kiln",
                     self.command, self.path, time.monotonic() - started)
            self.close_connection = True
            return
        except (OSError, http.client.HTTPException, CaddyProxyError) as exc:
            self.error(502, f"kiln caddy-proxy cannot get {path} from Kiln at "
                            f"{self.server.server_url}: {exc}")
            return
        try:
            if resp.status in (401, 403):
                log.warning("Kiln refused %s %s (%d): start kiln caddy-proxy with a valid "
                            "--api-key (or KILN_API_KEY)", self.command, path, resp.status)
            sent = self._relay(resp)
        finally:
            conn.close()
        log.info("%s %s -> %d, %d bytes after %.1fs", self.command, self.path, resp.status,
                 sent, time.monotonic() - started)

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self.error(405, f"kiln caddy-proxy forwards GET and HEAD only, not {self.command}")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _open(self, url: str, headers: dict[str, str]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the request to Kiln, following redirects; return the final response."""
        for _ in range(MAX_REDIRECTS + 1):
            conn = self.server.upstream(url)
            try:
                sent = dict(headers)
                if self.server.api_key and self.server.is_kiln(url):
                    sent["Authorization"] = f"Bearer {self.server.api_key}"
                parts = urllib.parse.urlsplit(url)
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request(self.command, target, headers=sent)
                assert conn.sock is not None
                conn.sock.settimeout(None)  # a held download: Kiln answers when it is built
                resp = self._await(conn)
            except BaseException:
                conn.close()
                raise
            location = resp.getheader("Location")
            if resp.status not in REDIRECTS or not location:
                return conn, resp
            conn.close()
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise CaddyProxyError(f"Kiln redirected to {location!r}, not an http(s) URL")
        raise CaddyProxyError(f"more than {MAX_REDIRECTS} redirects")

    def _await(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """Wait for Kiln's answer; raise _ClientGone if the client leaves meanwhile.

        A watcher thread waits on the client's socket (and a wake-up pair) and, if the client
        goes, shuts the request to Kiln down, which ends the wait here and lets Kiln go too.
        It does not look at Kiln's socket: with https://, TLS session tickets make that
        readable long before the answer.
        """
        upstream = conn.sock
        assert upstream is not None
        wake_r, wake_w = socket.socketpair()
        left = threading.Event()

        def watch() -> None:
            while True:
                readable, _, _ = select.select([self.connection, wake_r], [], [])
                if wake_r in readable:
                    return
                if self._client_left():
                    left.set()
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_RDWR)
                    return

        watcher = threading.Thread(target=watch, name=f"watch-{self.client_address[1]}",
                                   daemon=True)
        watcher.start()
        try:
            return conn.getresponse()
        except (OSError, http.client.HTTPException):
            if left.is_set():
                raise _ClientGone from None
            raise
        finally:
            wake_w.send(b"x")
            watcher.join()
            wake_r.close()
            wake_w.close()

    def _client_left(self) -> bool:
        """Report whether the readable client socket closed (an HTTP/1.1 client waiting for
        its answer sends nothing else: data, a close_notify or EOF all end the tunnel)."""
        tunnel = self.connection
        tunnel.setblocking(False)
        try:
            tunnel.recv(1)
        except ssl.SSLWantReadError:
            return False  # part of a TLS record (a key update); nothing for HTTP yet
        except OSError:
            return True
        finally:
            tunnel.settimeout(self.server.idle_timeout)
        return True

    def _relay(self, resp: http.client.HTTPResponse) -> int:
        """Stream Kiln's response to the client; return the body bytes sent."""
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        chunked = not no_body and length is None
        if length is not None:
            self.send_header("Content-Length", length)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return 0
        sent = 0
        while True:
            try:
                chunk = resp.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                # the client sees a short body (Go's io.Copy fails; caddy restores its backup)
                log.warning("%s %s: Kiln's response broke off after %d bytes: %s",
                            self.command, self.path, sent, exc)
                self.close_connection = True
                return sent
            if not chunk:
                break
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            except OSError as exc:
                log.info("%s %s: the client went away after %d bytes: %s", self.command,
                         self.path, sent, exc)
                self.close_connection = True
                return sent
            sent += len(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return sent


# -- the command -------------------------------------------------------------------------


def cmd_caddy_proxy(args: argparse.Namespace) -> int:
    """Let existing caddy binaries' add-package/upgrade build with this Kiln."""
    from kiln.config import LoggingConfig
    from kiln.logconfig import setup_logging

    setup_logging(LoggingConfig(), process="caddy-proxy")
    try:
        files = ensure_certificates(Path(args.ca_dir))
        proxy = CaddyProxy(parse_listen(args.listen), server_url=args.server,
                           tls=server_context(files), api_key=args.api_key,
                           max_connections=args.max_connections)
    except (CaddyProxyError, OSError, ssl.SSLError) as exc:
        print(f"kiln caddy-proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, _ = parse_listen(args.listen)
    where = f"[{host}]:{proxy.port}" if ":" in host else f"{host}:{proxy.port}"
    print(f"kiln caddy-proxy: forwarding {TARGET_HOST}'s {', '.join(FORWARDED_PATHS)} to "
          f"{proxy.server_url}" + (" with an API key" if args.api_key else ""))
    print(f"SSL_CERT_FILE={files.ca_cert}")
    print(f"run caddy with: HTTPS_PROXY=http://{where} SSL_CERT_FILE={files.ca_cert} "
          "caddy add-package ...", flush=True)
    with proxy, contextlib.suppress(KeyboardInterrupt):
        proxy.serve_forever()
    return 0


def add_command(sub: Any) -> None:
    """Add ``kiln caddy-proxy`` to the ``kiln`` command's subparsers."""
    from kiln.client.builds import DEFAULT_SERVER

    p = sub.add_parser(
        "caddy-proxy", help="point existing caddy binaries' add-package/upgrade at Kiln",
        description="An HTTPS proxy for the caddy binary: it tunnels only CONNECT "
        f"{TARGET_HOST}:{TARGET_PORT}, answers with a certificate from its own CA, and "
        f"forwards {', '.join(FORWARDED_PATHS)} to Kiln. Run caddy with HTTPS_PROXY=http://"
        "<listen> and SSL_CERT_FILE=<ca-dir>/ca.pem.")
    p.add_argument("--server", default=os.environ.get("KILN_SERVER") or DEFAULT_SERVER,
                   help="Kiln's URL (default: $KILN_SERVER or %(default)s)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="where the proxy listens (default: %(default)s)")
    p.add_argument("--ca-dir", default=DEFAULT_CA_DIR, metavar="DIR",
                   help="where the CA and caddyserver.com's certificate are made and kept "
                   "(default: %(default)s); clients get DIR/ca.pem as SSL_CERT_FILE")
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY", ""),
                   help="API key sent to Kiln as a bearer token, for auth.mode: keys "
                   "(default: $KILN_API_KEY)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help="client connections served at once; each held download keeps one "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_caddy_proxy)
