"""A client of the Go module proxy protocol (GOPROXY lists, http(s) and file://)."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kiln.errors import KilnError
from kiln.gomod.module import encode_path, encode_version
from kiln.gomod.semver import canonical_version, is_pseudo_version, is_semver, semver_sort
from kiln.resolve.budget import ProxyBudget

PROXY_TIMEOUT_SECONDS = 30.0
USER_AGENT = "kiln (module resolver)"
_MAX_LIST_BYTES = 8 << 20
_MAX_INFO_BYTES = 1 << 20
_MAX_MOD_BYTES = 4 << 20
_MAX_DETAIL_CHARS = 300
_READ_CHUNK = 64 << 10


class ModuleNotFound(KilnError):
    """A module, or a version of it, does not exist: permanent, retrying will not help."""

    def __init__(self, module: str, query: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.query = query
        # The proxy's own explanation, when it gave one: for logs, not for users.
        self.detail = detail


class ModuleRefused(ModuleNotFound):
    """The proxy refused the request (400 or 403): it will not serve it as asked."""


class ProxyUnavailable(KilnError):
    """The module proxy could not be reached or failed: retryable."""


@dataclass(frozen=True)
class VersionInfo:
    """A proxy's answer for one version: the absolute version and its commit time."""

    version: str
    time: datetime | None = None


def _redact(url: str) -> str:
    """Hide a password in a URL for messages."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _timed_out(exc: BaseException) -> bool:
    """Return whether a urllib error is a socket timeout."""
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def _detail(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().splitlines()
    line = text[0] if text else ""
    return line[:_MAX_DETAIL_CHARS]


# ModuleProxy.list shadows the builtin inside the class body.
_Versions = list[str]


class _NotFound(Exception):
    """One proxy has nothing at that address (404/410 or a missing file)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


class _Rejected(Exception):
    """One proxy refused the request as malformed (400): permanent."""


@dataclass(frozen=True)
class _Entry:
    url: str
    # True when the separator after this entry is "|": fall through on any error.
    fallthrough_on_error: bool
    # "Basic ..." when the GOPROXY entry carried user:password@; never shown.
    authorization: str = field(default="", repr=False)


def _split_credentials(url: str) -> tuple[str, str]:
    """Return the URL without user:password@ and the Basic authorization it implies."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


class ModuleProxy:
    """A client for a GOPROXY list of http(s):// and file:// module proxies."""

    def __init__(self, goproxy: str, *, timeout: float = PROXY_TIMEOUT_SECONDS,
                 budget: ProxyBudget | None = None) -> None:
        self.timeout = timeout
        #: what every HTTP call spends from (one per API request; see spending); None: no bound
        self.budget = budget
        self._entries = self._parse(goproxy)
        # One opener per client: it honours HTTPS_PROXY/NO_PROXY from the environment.
        self._opener = urllib.request.build_opener()

    def spending(self, budget: ProxyBudget) -> ModuleProxy:
        """Return this client (same proxies, same opener) with every HTTP call spending from budget."""
        bounded = copy.copy(self)
        bounded.budget = budget
        return bounded

    @staticmethod
    def _parse(goproxy: str) -> tuple[_Entry, ...]:
        entries: list[_Entry] = []
        for match in re.finditer(r"([^,|]*)([,|]?)", goproxy.strip()):
            url, sep = match.group(1).strip(), match.group(2)
            if url == "":
                if sep:
                    raise ValueError(f"GOPROXY {_redact(goproxy)!r} has an empty entry")
                continue
            if url in ("direct", "off"):
                raise ValueError(
                    f"GOPROXY entry {url!r} is not supported: Kiln needs a module proxy "
                    "(for example https://proxy.golang.org); remove 'direct' and 'off'"
                )
            try:
                scheme = urllib.parse.urlsplit(url).scheme
                plain, authorization = _split_credentials(url)
            except ValueError:
                scheme, plain, authorization = "", url, ""
            if scheme not in ("http", "https", "file"):
                raise ValueError(
                    f"GOPROXY entry {_redact(url)!r} must be an https://, http:// or file:// URL"
                )
            entries.append(
                _Entry(
                    url=plain.rstrip("/"),
                    fallthrough_on_error=sep == "|",
                    authorization=authorization,
                )
            )
        if not entries:
            raise ValueError(
                "GOPROXY is empty: Kiln needs a module proxy such as https://proxy.golang.org"
            )
        return tuple(entries)

    @property
    def urls(self) -> tuple[str, ...]:
        """Return the proxy base URLs in the order they are tried."""
        return tuple(e.url for e in self._entries)

    def __repr__(self) -> str:
        return f"ModuleProxy({', '.join(self.urls)!r})"

    # -- transport ---------------------------------------------------------

    def _fetch_one(self, entry: _Entry, rel: str, limit: int) -> bytes:
        base = entry.url
        if base.startswith("file:"):
            return self._read_file(base, rel, limit)
        url = f"{base}/{rel}"
        headers = {"User-Agent": USER_AGENT}
        if entry.authorization:
            headers["Authorization"] = entry.authorization
        req = urllib.request.Request(url, headers=headers)
        budget = self.budget
        # a call never waits past the request's deadline (cached answers never get here)
        timeout = self.timeout if budget is None else budget.spend(self.timeout)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                body = self._read(resp, limit)
        except urllib.error.HTTPError as exc:
            body = b""
            try:
                if (exc.headers.get("Content-Type") or "").startswith("text/plain"):
                    body = exc.read(4096)
            except Exception:
                pass  # the body only adds detail
            finally:
                exc.close()
            if exc.code in (404, 410):
                raise _NotFound(_detail(body)) from None
            if exc.code == 400:
                raise _Rejected(f"{url}: {_detail(body) or 'bad request'}") from None
            if exc.code == 403:
                # a curated or partial proxy refusing what it does not serve: the request
                # must change (Go reports it too, and does not fall through to the next)
                raise _Rejected(f"{url} answered 403: {_detail(body) or 'forbidden'}") from None
            raise ProxyUnavailable(f"module proxy {base} answered {exc.code} for {rel}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if budget is not None and (budget.expired()
                                       or (timeout < self.timeout and _timed_out(exc))):
                # the wait was cut short by the deadline, not by proxy_timeout
                raise budget.overdue() from None
            reason = getattr(exc, "reason", exc)
            raise ProxyUnavailable(f"module proxy {base} is unreachable: {reason}") from None
        except KilnError:
            raise
        except Exception as exc:  # http.client errors such as RemoteDisconnected
            if budget is not None and budget.expired():
                raise budget.overdue() from None
            raise ProxyUnavailable(f"module proxy {base} failed: {exc!r}") from None
        if len(body) > limit:
            raise ProxyUnavailable(f"module proxy {base} sent more than {limit} bytes for {rel}")
        return body

    def _read(self, resp: http.client.HTTPResponse, limit: int) -> bytes:
        """Read at most limit + 1 bytes, checking the deadline between reads.

        Each read waits at most the call's timeout; a proxy that trickles its answer is
        cut off at the first read that ends past the deadline.
        """
        budget = self.budget
        # an HTTPResponse; anything else a redirect could yield (ftp://) is read as it comes
        read = getattr(resp, "read1", resp.read)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = read(min(_READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if budget is not None and budget.expired():
                raise budget.overdue()
        return b"".join(chunks)

    @staticmethod
    def _read_file(base: str, rel: str, limit: int) -> bytes:
        root = Path(urllib.request.url2pathname(urllib.parse.urlsplit(base).path))
        path = root.joinpath(*rel.split("/"))
        try:
            with path.open("rb") as fh:
                body = fh.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _NotFound() from None
        except OSError as exc:
            raise ProxyUnavailable(f"module proxy {base} cannot be read: {exc}") from None
        if len(body) > limit:
            raise ProxyUnavailable(f"module proxy {base} has more than {limit} bytes in {rel}")
        return body

    def _get(self, rel: str, limit: int, *, http_only: bool = False) -> tuple[bytes | None, str]:
        """Fetch rel from the first proxy that has it: (body, "") or (None, last not-found detail)."""
        detail = ""
        error: Exception | None = None
        for entry in self._entries:
            if http_only and entry.url.startswith("file:"):
                continue
            try:
                return self._fetch_one(entry, rel, limit), ""
            except _NotFound as exc:
                detail = exc.detail or detail
                continue
            except (ProxyUnavailable, _Rejected) as exc:
                if entry.fallthrough_on_error:
                    error = error or exc
                    continue
                raise
        if error is not None:
            # Go prefers a real failure over "not found" when every proxy failed.
            raise error
        return None, detail

    # -- protocol ----------------------------------------------------------

    def _call(
        self, module: str, query: str, rel: str, limit: int, *, http_only: bool = False
    ) -> tuple[bytes | None, str]:
        try:
            return self._get(f"{encode_path(module)}/{rel}", limit, http_only=http_only)
        except _Rejected as exc:
            hint = ""
            if rel in ("@v/list", "@latest"):
                hint = (f"; this proxy lists no versions of {module}: ask for an exact "
                        f"version ({module}@vX.Y.Z)")
            raise ModuleRefused(
                module, query, f"{module}@{query}: rejected by the module proxy: {exc}{hint}"
            ) from None

    def list(self, module: str) -> _Versions:
        """Return the tagged versions in @v/list (semver only, pseudo-versions dropped), ascending."""
        return [v for v in self.list_all(module) if not is_pseudo_version(v)]

    def list_all(self, module: str) -> _Versions:
        """Return every valid version in @v/list, pseudo-versions included, ascending."""
        body, detail = self._call(module, "latest", "@v/list", _MAX_LIST_BYTES)
        if body is None:
            raise _unknown_module(module, "latest", detail)
        seen: set[str] = set()
        for line in body.decode("utf-8", "replace").splitlines():
            fields = line.split()
            if fields and is_semver(fields[0]):
                seen.add(fields[0])
        return semver_sort(seen)

    def info(self, module: str, query: str) -> VersionInfo:
        """Return the proxy's @v/<query>.info; raise ModuleNotFound if no proxy knows it."""
        try:
            rel = f"@v/{encode_version(query)}.info"
        except ValueError:
            raise ModuleNotFound(
                module,
                query,
                f'{module} has no version matching "{query}": '
                "that name cannot be looked up through a module proxy",
            ) from None
        # A file:// proxy holds only tagged versions; Go asks it nothing else.
        absolute = is_semver(query) and canonical_version(query) == query
        body, detail = self._call(module, query, rel, _MAX_INFO_BYTES, http_only=not absolute)
        if body is None:
            raise _no_version(module, query, detail)
        return self._parse_info(module, query, body)

    def latest(self, module: str) -> VersionInfo | None:
        """Return the proxy's @latest answer, or None when no proxy has one."""
        body, _ = self._call(module, "latest", "@latest", _MAX_INFO_BYTES)
        if body is None:
            return None
        return self._parse_info(module, "latest", body)

    def go_mod(self, module: str, version: str) -> str | None:
        """Return the go.mod of an absolute version (@v/<version>.mod), or None if absent."""
        body, _ = self._call(module, version, f"@v/{encode_version(version)}.mod", _MAX_MOD_BYTES)
        return None if body is None else body.decode("utf-8", "replace")

    def _parse_info(self, module: str, query: str, body: bytes) -> VersionInfo:
        try:
            data = json.loads(body)
            version = data["Version"]
        except (ValueError, KeyError, TypeError):
            raise ProxyUnavailable(
                f"module proxy sent a malformed answer for {module}@{query}"
            ) from None
        if (
            not isinstance(version, str)
            or not is_semver(version)
            or canonical_version(version) != version
        ):
            raise ProxyUnavailable(
                f"module proxy sent an invalid version {version!r} for {module}@{query}"
            )
        return VersionInfo(version=version, time=_parse_time(data.get("Time")))


def _unknown_module(module: str, query: str, detail: str = "") -> ModuleNotFound:
    msg = f"unknown module {module}: not found on the module proxy"
    return ModuleNotFound(module, query, msg, detail)


def _no_version(module: str, query: str, detail: str = "") -> ModuleNotFound:
    return ModuleNotFound(module, query, f'{module} has no version matching "{query}"', detail)
