"""The upstream module proxy the cache reads through: plain GETs, bodies spooled to disk."""

from __future__ import annotations

import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import requests
import requests.adapters

from kiln.errors import KilnError

USER_AGENT = "kiln (module cache)"
UPSTREAM_TIMEOUT_SECONDS = 60.0
#: Go's own limits (cmd/go/internal/modfetch): a module zip, a go.mod; others are small
MAX_ZIP_BYTES = 500 << 20
MAX_SMALL_BYTES = 16 << 20
_CHUNK = 1 << 20
_SPOOL_BYTES = 8 << 20
#: connections kept open to upstream, shared by the go command's parallel fetches
POOL_CONNECTIONS = 32


class UpstreamUnavailable(KilnError):
    """The upstream proxy could not be reached, or failed (5xx, a cut-off answer)."""


@dataclass
class Answer:
    """An upstream answer: its status, content type and body (a spooled file)."""

    status: int
    content_type: str
    body: IO[bytes]


def first_http_proxy(goproxy: str) -> str:
    """Return the first http(s) entry of a GOPROXY list, without a trailing slash."""
    for part in re.split(r"[,|]", goproxy):
        if part.startswith(("http://", "https://")):
            return part.rstrip("/")
    raise KilnError(f"build.goproxy {goproxy!r} has no http(s):// entry for the module cache "
                    "to read through")


class Upstream:
    """GET files of one upstream proxy over pooled connections (credentials in its URL are
    sent as basic auth, never passed on)."""

    def __init__(self, url: str, *, timeout: float = UPSTREAM_TIMEOUT_SECONDS,
                 connections: int = POOL_CONNECTIONS) -> None:
        parts = urllib.parse.urlsplit(url)
        self.auth: tuple[str, str] | None = None
        if parts.username is not None:
            self.auth = (urllib.parse.unquote(parts.username),
                         urllib.parse.unquote(parts.password or ""))
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        self.base = urllib.parse.urlunsplit(parts).rstrip("/")
        self.timeout = timeout
        # one TLS connection per request made a cold fetch through the cache 2.4x slower
        # than go's own (which keeps its connections); the go command's parallel fetches
        # share this pool
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = USER_AGENT

    def __repr__(self) -> str:
        return f"Upstream({self.base})"

    def get(self, rel: str, *, limit: int = MAX_SMALL_BYTES) -> Answer:
        """GET ``<base>/<rel>``; raise UpstreamUnavailable on a 5xx or a network failure.

        A 4xx is an answer (the module or version does not exist): it is passed on.
        """
        try:
            with self.session.get(f"{self.base}/{rel}", auth=self.auth, timeout=self.timeout,
                                  stream=True, allow_redirects=True) as response:
                if response.status_code >= 500:
                    raise UpstreamUnavailable(
                        f"{self.base}/{rel}: {response.status_code} {response.reason}")
                body = _spool(response.iter_content(_CHUNK), limit, rel)
                return Answer(response.status_code,
                              response.headers.get("Content-Type", ""), body)
        except (requests.RequestException, OSError) as exc:
            raise UpstreamUnavailable(f"{self.base}/{rel}: {exc}") from None


def _spool(chunks: Iterator[bytes], limit: int, rel: str) -> IO[bytes]:
    out = tempfile.SpooledTemporaryFile(_SPOOL_BYTES)  # noqa: SIM115 - returned
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            out.close()
            raise UpstreamUnavailable(f"{rel} is larger than {limit} bytes")
        out.write(chunk)
    out.seek(0)
    return out  # type: ignore[return-value]
