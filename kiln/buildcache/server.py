"""The socket a compile step's GOCACHEPROG program asks (worker_image/cacheprog/main.go).

One Unix socket per build, served while its compile runs, so that what a step puts is
staged for its own build only. One JSON line per request; a put's line is followed by its
output's bytes:

  {"Command":"get","ActionID":"<hex>"}  -> {"Miss":true} | {"OutputID","Size","Name"}
  {"Command":"put","ActionID","OutputID","Size"} + bytes -> {"Name"} | {"Err"}

``Name`` is the output's path under the outputs directory the program reads. A request
that is not one of these gets an ``Err`` and its connection is closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: longest request line (the ids are 64 hex digits)
MAX_LINE_BYTES = 4096


class Stored(Protocol):
    """An entry as the session returns it (kiln/buildcache/cache.py's Entry)."""

    @property
    def output(self) -> str: ...

    @property
    def size(self) -> int: ...


class Body(Protocol):
    """The bytes of a put, as they arrive."""

    def read(self, size: int, /) -> bytes: ...


class Session(Protocol):
    """The build the socket serves (kiln/buildcache/cache.py's BuildSession).

    ``put`` raises ValueError for a request it refuses, OSError when it cannot keep one.
    """

    def get(self, action: str) -> Stored | None: ...

    def put(self, action: str, output: str, size: int, body: Body) -> Stored: ...


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        session = self.server.session
        while line := self.rfile.readline(MAX_LINE_BYTES + 1):
            try:
                request = _parse(line)
                reply, keep = self._answer(session, request), True
            except ValueError as exc:
                reply, keep = {"Err": str(exc)}, False
            except OSError as exc:
                log.warning("build cache: a put failed: %s", exc)
                reply, keep = {"Err": f"the worker could not keep it: {exc}"}, False
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()
            if not keep:
                return

    def _answer(self, session: Session, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("Command")
        action = str(request.get("ActionID", ""))
        if command == "get":
            entry = session.get(action)
            if entry is None:
                return {"Miss": True}
            return {"OutputID": entry.output, "Size": entry.size, "Name": entry.output}
        if command == "put":
            size = request.get("Size", 0)
            if type(size) is not int:
                raise ValueError("Size is a number of bytes")
            entry = session.put(action, str(request.get("OutputID", "")), size, self.rfile)
            return {"Name": entry.output}
        raise ValueError(f"unknown command {command!r}")


def _parse(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line) if len(line) <= MAX_LINE_BYTES else None
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise ValueError(f"a request is one JSON object on one line of at most "
                         f"{MAX_LINE_BYTES} bytes")
    return request


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    session: Session


class CacheServer:
    """Serve one build's session on a Unix socket at ``path`` until ``close``."""

    def __init__(self, session: Session, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self._server = _Server(str(path), _Handler)
        self._server.session = session
        # the sandbox user (another uid) connects; only this build's step is given the socket
        os.chmod(path, 0o666)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="kiln-buildcache", daemon=True)
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()
