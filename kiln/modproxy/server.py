"""The module cache's HTTP face: the GOPROXY protocol on a worker-local address.

Each worker serves it for its own fetch steps (``127.0.0.1`` for the process sandbox, the
sandbox network's gateway for the docker sandbox); GET and HEAD only. Its answers are the
protocol's: files, and text/plain errors the go command quotes (``server response:``); a path
the protocol does not have is a 400 with a JSON body saying what is asked for.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from kiln.modproxy.cache import BadRequest, ModuleCache, Reply
from kiln.modproxy.upstream import UpstreamUnavailable

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._json(405, "the module proxy answers GET requests only")

    do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        log.debug("modproxy: " + format, *args)

    def _serve(self, *, body: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        try:
            reply = self.server.cache.get(rel)
        except BadRequest as exc:
            self._json(400, str(exc))
            return
        except UpstreamUnavailable as exc:
            log.warning("module proxy upstream failed: %s", exc)
            self._text(502, f"upstream module proxy unavailable: {exc}\n")
            return
        except Exception:
            log.exception("module cache failed on %s", rel)
            self._text(500, "internal error of the module cache\n")
            return
        self._send(reply, body=body)

    def _send(self, reply: Reply, *, body: bool) -> None:
        with reply.body:
            reply.body.seek(0, 2)
            size = reply.body.tell()
            reply.body.seek(0)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if body:
                shutil.copyfileobj(reply.body, self.wfile, _CHUNK)

    def _text(self, status: int, message: str) -> None:
        data = message.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, message: str) -> None:
        data = json.dumps({"status_code": status, "error": {"message": message}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    cache: ModuleCache


class ModuleProxyServer:
    """Serve a ModuleCache over HTTP on ``host:port`` (port 0: any free one) in a thread."""

    def __init__(self, cache: ModuleCache, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = _Server((host, port), _Handler)
        self.server.cache = cache
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Return the base URL fetch steps on this host use as GOPROXY."""
        return f"http://{self.host}:{self.port}"

    def url_for(self, host: str) -> str:
        """Return the base URL as seen from ``host`` (e.g. a container network's gateway)."""
        return f"http://{host}:{self.port}"

    def start(self) -> ModuleProxyServer:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.server.serve_forever,
                                            name="kiln-modproxy", daemon=True)
            self._thread.start()
            log.info("module cache serving the GOPROXY protocol on %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server.server_close()
