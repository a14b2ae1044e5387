"""The upstream module proxy the cache reads through: plain GETs, bodies spooled to disk."""

from __future__ import annotations

import base64
import contextlib
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO

from kiln.errors import KilnError

USER_AGENT = "kiln (module cache)"
UPSTREAM_TIMEOUT_SECONDS = 60.0
#: Go's own limits (cmd/go/internal/modfetch): a module zip, a go.mod; others are small
MAX_ZIP_BYTES = 500 << 20
MAX_SMALL_BYTES = 16 << 20
_CHUNK = 1 << 20
_SPOOL_BYTES = 8 << 20


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
    """GET files of one upstream proxy (credentials in its URL are sent as basic auth)."""

    def __init__(self, url: str, *, timeout: float = UPSTREAM_TIMEOUT_SECONDS) -> None:
        parts = urllib.parse.urlsplit(url)
        self.auth = ""
        if parts.username is not None:
            creds = f"{urllib.parse.unquote(parts.username)}:" \
                    f"{urllib.parse.unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(creds.encode()).decode()
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        self.base = urllib.parse.urlunsplit(parts).rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Upstream({self.base})"

    def get(self, rel: str, *, limit: int = MAX_SMALL_BYTES) -> Answer:
        """GET ``<base>/<rel>``; raise UpstreamUnavailable on a 5xx or a network failure.

        A 4xx is an answer (the module or version does not exist): it is passed on.
        """
        request = urllib.request.Request(f"{self.base}/{rel}",
                                         headers={"User-Agent": USER_AGENT})
        if self.auth:
            request.add_header("Authorization", self.auth)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise UpstreamUnavailable(f"{self.base}/{rel}: {exc.code} {exc.reason}") from None
            with contextlib.closing(exc):
                return Answer(exc.code, exc.headers.get("Content-Type", "text/plain"),
                              _spool(exc, limit, rel))
        except (urllib.error.URLError, OSError) as exc:
            raise UpstreamUnavailable(f"{self.base}/{rel}: {exc}") from None
        with contextlib.closing(response):
            try:
                body = _spool(response, limit, rel)
            except OSError as exc:
                raise UpstreamUnavailable(f"{self.base}/{rel}: {exc}") from None
            return Answer(response.status, response.headers.get("Content-Type", ""), body)


def _spool(response: IO[bytes], limit: int, rel: str) -> IO[bytes]:
    out = tempfile.SpooledTemporaryFile(_SPOOL_BYTES)  # noqa: SIM115 - returned
    size = 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            out.close()
            raise UpstreamUnavailable(f"{rel} is larger than {limit} bytes")
        out.write(chunk)
    out.seek(0)
    return out  # type: ignore[return-value]
