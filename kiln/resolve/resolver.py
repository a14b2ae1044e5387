"""Turn version queries into absolute versions through the Go module proxy protocol.

`ModuleProxy` speaks the GOPROXY protocol (``$base/$module/@v/list``, ``@v/$version.info``,
``@v/$version.mod``, ``@latest``) over http(s) or against a ``file://`` tree, with Go's
rules for falling through a list of proxies. `Resolver` applies cmd/go's query
semantics on top ("latest", ``v1.2`` prefixes, exact versions, branches and commits,
retractions, ``+incompatible``) and caches answers: absolute versions for good,
moving queries for a short, clock-measured time.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from kiln.request.spec import (
    CADDY_MODULE,
    DEFAULT_LDFLAGS,
    DEFAULT_TAGS,
    BuildRequest,
    BuildSpec,
    PluginRequest,
    Replacement,
    ResolvedPlugin,
    SpecError,
    canonical_version,
    check_import_path,
    check_module_path,
    check_path_major,
    check_version_query,
    is_core_package,
    is_prerelease,
    is_pseudo_version,
    is_semver,
    module_prefixes,
    query_kind,
    semver_build,
    semver_compare,
    semver_major,
    semver_sort,
    split_path_version,
)

PROXY_TIMEOUT_SECONDS = 30.0
LATEST_TTL_SECONDS = 300.0
MISSING_TTL_SECONDS = 60.0
CACHE_MAX_ENTRIES = 10_000
USER_AGENT = "kiln (module resolver)"

_MAX_LIST_BYTES = 8 << 20
_MAX_INFO_BYTES = 1 << 20
_MAX_MOD_BYTES = 4 << 20
_MAX_DETAIL_CHARS = 300


class ModuleNotFound(Exception):
    """A module, or a version of it, does not exist: permanent, retrying will not help."""

    def __init__(self, module: str, query: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.query = query
        # The proxy's own explanation, when it gave one: for logs, not for users.
        self.detail = detail


class ModuleRefused(ModuleNotFound):
    """The proxy refused the request (400 or 403): it will not serve it as asked."""


class ProxyUnavailable(Exception):
    """The module proxy could not be reached or failed: retryable."""


@dataclass(frozen=True)
class VersionInfo:
    """A proxy's answer for one version: the absolute version and its commit time."""

    version: str
    time: datetime | None = None


def _escape(s: str, what: str) -> str:
    if "!" in s or not s.isascii():
        raise ValueError(f"cannot escape {what} {s!r}: it contains '!' or non-ASCII characters")
    if not any("A" <= c <= "Z" for c in s):
        return s
    return "".join("!" + c.lower() if "A" <= c <= "Z" else c for c in s)


def encode_path(path: str) -> str:
    """Return the case-encoded form of a module path ("!" + lowercase for capitals)."""
    check_module_path(path)
    return _escape(path, "module path")


_VERSION_FILE_OK = re.compile(r"[A-Za-z0-9!#$%&()+,\-.=@\[\]^_{}~ ]+")


def encode_version(version: str) -> str:
    """Return the case-encoded form of a version; raise ValueError for one that is no file name."""
    if (
        not version
        or "!" in version
        or not _VERSION_FILE_OK.fullmatch(version)
        or version.count(".") == len(version)
        or version.endswith(".")
    ):
        raise ValueError(f"disallowed version string {version!r}")
    return _escape(version, "version")


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

    def __init__(self, goproxy: str, *, timeout: float = PROXY_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self._entries = self._parse(goproxy)
        # One opener per client: it honours HTTPS_PROXY/NO_PROXY from the environment.
        self._opener = urllib.request.build_opener()

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
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body: bytes = resp.read(limit + 1)
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
            reason = getattr(exc, "reason", exc)
            raise ProxyUnavailable(f"module proxy {base} is unreachable: {reason}") from None
        except Exception as exc:  # http.client errors such as RemoteDisconnected
            raise ProxyUnavailable(f"module proxy {base} failed: {exc!r}") from None
        if len(body) > limit:
            raise ProxyUnavailable(f"module proxy {base} sent more than {limit} bytes for {rel}")
        return body

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


# ---------------------------------------------------------------------------
# go.mod retractions
# ---------------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    out = []
    quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and line.startswith("//", i):
            break
        out.append(c)
        i += 1
    return "".join(out).strip()


def _retraction(text: str) -> tuple[str, str] | None:
    text = text.replace('"', "").strip()
    if text.startswith("[") and text.endswith("]"):
        parts = [p.strip() for p in text[1:-1].split(",")]
        if len(parts) == 2 and all(is_semver(p) for p in parts):
            return parts[0], parts[1]
        return None
    return (text, text) if is_semver(text) else None


def parse_retractions(go_mod: str) -> list[tuple[str, str]]:
    """Return the retracted [low, high] version ranges declared in a go.mod file."""
    ranges: list[tuple[str, str]] = []
    in_block = False
    for raw in go_mod.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        if in_block:
            if line == ")":
                in_block = False
                continue
            found = _retraction(line)
        elif line == "retract (" or (line.startswith("retract") and line[7:].strip() == "("):
            in_block = True
            continue
        elif line.startswith("retract ") or line.startswith("retract\t"):
            found = _retraction(line[len("retract") :])
        else:
            continue
        if found:
            ranges.append(found)
    return ranges


def _retracted(version: str, ranges: Iterable[tuple[str, str]]) -> bool:
    return any(
        semver_compare(low, version) <= 0 <= semver_compare(high, version) for low, high in ranges
    )


# ---------------------------------------------------------------------------
# Resolution cache
# ---------------------------------------------------------------------------


class ResolutionCache(Protocol):
    """Where resolved versions are kept; stored_at is a reading of the Resolver's clock."""

    def get(self, module: str, query: str) -> tuple[str, float] | None:
        """Return (version, stored_at) for a module and query, or None."""
        ...

    def put(self, module: str, query: str, version: str, stored_at: float) -> None:
        """Store the version a module and query resolved to."""
        ...


class MemoryResolutionCache:
    """A thread-safe in-process ResolutionCache that forgets its oldest entries past a bound."""

    def __init__(self, *, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def get(self, module: str, query: str) -> tuple[str, float] | None:
        """Return (version, stored_at) for a module and query, or None."""
        with self._lock:
            return self._data.get((module, query))

    def put(self, module: str, query: str, version: str, stored_at: float) -> None:
        """Store the version a module and query resolved to."""
        with self._lock:
            self._data[(module, query)] = (version, stored_at)
            self._data.move_to_end((module, query))
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


# ---------------------------------------------------------------------------
# Resolver
# ---------------------------------------------------------------------------


class Resolver:
    """Resolve version queries with cmd/go's semantics through a ModuleProxy, with caching.

    The clock must be wall-clock seconds (time.time) when the cache is shared between
    processes, since stored_at readings are compared across them.
    """

    def __init__(
        self,
        proxy: ModuleProxy,
        *,
        cache: ResolutionCache,
        clock: Callable[[], float] = time.time,
        latest_ttl: float = LATEST_TTL_SECONDS,
        missing_ttl: float = MISSING_TTL_SECONDS,
    ) -> None:
        self.proxy = proxy
        self.cache = cache
        self.clock = clock
        self.latest_ttl = latest_ttl
        self.missing_ttl = missing_ttl
        # Recent "not found" answers, so probing a package's candidate modules is cheap
        # when the same plugin is asked for again.
        self._missing: OrderedDict[tuple[str, str], tuple[float, ModuleNotFound]] = OrderedDict()
        self._missing_lock = threading.Lock()

    # -- public API --------------------------------------------------------

    def resolve(self, module: str, query: str) -> str:
        """Return the absolute version a module query selects; raise ModuleNotFound or ProxyUnavailable."""
        check_module_path(module)
        q = check_version_query(query)
        absolute = query_kind(q) == "semver"
        now = self.clock()
        hit = self.cache.get(module, q)
        if hit is not None:
            version, stored_at = hit
            if absolute or abs(now - stored_at) < self.latest_ttl:
                return version
        missing = self._recent_missing(module, q, now)
        if missing is not None:
            raise missing
        try:
            version = self._query(module, q)
        except ModuleNotFound as exc:
            self._remember_missing(module, q, now, exc)
            raise
        self.cache.put(module, q, version, now)
        if version != q:
            self.cache.put(module, version, version, now)
        return version

    def resolve_package(self, package_path: str, query: str) -> tuple[str, str]:
        """Return (module_root, version) of the longest module prefix of a package that resolves."""
        check_import_path(package_path)
        q = check_version_query(query)
        candidates = module_prefixes(package_path)
        tried: list[str] = []
        first_error: ModuleNotFound | None = None
        refused: ModuleRefused | None = None
        for candidate in candidates:
            try:
                return candidate, self.resolve(candidate, q)
            except ModuleNotFound as exc:
                tried.append(candidate)
                first_error = first_error or exc
                if isinstance(exc, ModuleRefused):
                    refused = refused or exc
        if len(tried) == 1 and first_error is not None:
            raise first_error
        raise ModuleNotFound(
            package_path,
            q,
            f"no module provides {package_path}@{q}: tried "
            + (", ".join(tried) if tried else "no valid module path")
            + (f" ({refused})" if refused else ""),
        )

    def resolve_plugin(self, plugin: PluginRequest) -> ResolvedPlugin:
        """Resolve a requested plugin to its package, module root and absolute version.

        A plugin named as base@vN.x.y (N >= 2) is also found as the base/vN module,
        which is what the go command would need to be told.
        """
        path, q = plugin.path, check_version_query(plugin.query)
        mapped = self._major_mapped(path, q)
        for prefix, module in mapped:
            try:
                version = self.resolve(module, q)
            except ModuleNotFound:
                continue
            return ResolvedPlugin(
                package=module + path[len(prefix) :], module=module, version=version
            )
        module, version = self.resolve_package(path, q)
        return ResolvedPlugin(package=path, module=module, version=version)

    def available_versions(self, module: str) -> list[str]:
        """Return a module's releases and prereleases, newest first, in semver order."""
        check_module_path(module)
        path_major = split_path_version(module)[1]
        versions = [v for v in self.proxy.list(module) if check_path_major(v, path_major) is None]
        return semver_sort(versions, reverse=True)

    # -- internals ---------------------------------------------------------

    def _recent_missing(self, module: str, query: str, now: float) -> ModuleNotFound | None:
        with self._missing_lock:
            entry = self._missing.get((module, query))
            if entry is None:
                return None
            at, exc = entry
            if abs(now - at) < self.missing_ttl:
                return exc
            del self._missing[(module, query)]
            return None

    def _remember_missing(self, module: str, query: str, now: float, exc: ModuleNotFound) -> None:
        if self.missing_ttl <= 0:
            return
        with self._missing_lock:
            self._missing[(module, query)] = (now, exc)
            self._missing.move_to_end((module, query))
            while len(self._missing) > CACHE_MAX_ENTRIES:
                self._missing.popitem(last=False)

    @staticmethod
    def _major_mapped(path: str, query: str) -> list[tuple[str, str]]:
        """Return (prefix, prefix/vN) pairs to try when a v2+ version names a path without /vN."""
        if query_kind(query) not in ("semver", "prefix") or semver_build(query) == "+incompatible":
            return []
        major = semver_major(query)
        if major in ("v0", "v1") or path.startswith("gopkg.in/"):
            return []
        prefixes = module_prefixes(path)
        if any(split_path_version(p)[1] == "/" + major for p in prefixes):
            return []
        pairs = []
        for prefix in prefixes:
            if split_path_version(prefix)[1] == "":
                module = f"{prefix}/{major}"
                try:
                    check_module_path(module)
                except SpecError:
                    continue
                pairs.append((prefix, module))
        return pairs

    def _query(self, module: str, q: str) -> str:
        kind = query_kind(q)
        path_major = split_path_version(module)[1]
        if kind == "semver":
            return self._stat_semver(module, q, path_major)
        if kind in ("commit", "branch"):
            info = self.proxy.info(module, q)
            problem = check_path_major(info.version, path_major)
            if problem:
                raise ModuleNotFound(
                    module, q, f"{module}@{q} resolves to {info.version}, which {problem}"
                )
            return info.version
        return self._query_list(module, q, path_major, kind == "latest")

    def _stat_semver(self, module: str, q: str, path_major: str) -> str:
        problem = check_path_major(q, path_major)
        if problem:
            if path_major == "" and semver_build(q) == "":
                # Go tries the +incompatible form of a v2+ version on a path without /vN.
                incompatible = canonical_version(q) + "+incompatible"
                try:
                    return self.proxy.info(module, incompatible).version
                except ModuleNotFound:
                    pass
            raise ModuleNotFound(
                module, q, f'{module} has no version matching "{q}": the version {problem}'
            )
        try:
            info = self.proxy.info(module, q)
        except ModuleNotFound:
            canon = canonical_version(q)
            if canon == q:
                raise
            # Build metadata is not part of a version's identity: try without it.
            info = self.proxy.info(module, canon)
        return info.version

    def _query_list(self, module: str, q: str, path_major: str, is_latest: bool) -> str:
        refused: ModuleRefused | None = None
        try:
            listed = self.proxy.list_all(module)
        except ModuleNotFound as exc:
            listed = []
            list_missing = True
            # a proxy that refuses to list says more than "unknown module" would
            refused = exc if isinstance(exc, ModuleRefused) else None
        else:
            list_missing = False
        tagged = [v for v in listed if not is_pseudo_version(v)]
        prefix = "" if is_latest else q + "."

        def matches(v: str) -> bool:
            if check_path_major(v, path_major) is not None:
                return False
            if prefix:
                # "v1.2" must not pick v1.2.0's prereleases (golang.org/issue/31972).
                return v.startswith(prefix) and semver_compare(v, q) >= 0
            return True

        prefer_incompatible = bool(prefix) and check_path_major(q, path_major) is not None
        candidates = self._filter_incompatible(
            module, [v for v in tagged if matches(v)], prefer_incompatible
        )
        choice = self._pick(candidates, ())
        if choice is not None:
            if is_latest:
                everything = candidates
            else:
                everything = self._filter_incompatible(
                    module, [v for v in tagged if check_path_major(v, path_major) is None], False
                )
            retractions = self._retractions(module, everything)
            # If every candidate is retracted, Go would still need something: keep the plain pick.
            return self._pick(candidates, retractions) or choice

        if is_latest:
            latest = self.proxy.latest(module)
            if latest is not None and check_path_major(latest.version, path_major) is None:
                return latest.version
            # Go computes @latest from the list itself when a proxy has no @latest.
            pseudos = [
                v
                for v in listed
                if is_pseudo_version(v) and check_path_major(v, path_major) is None
            ]
            if pseudos:
                return semver_sort(pseudos)[-1]
            try:
                return self.proxy.info(module, "latest").version
            except ModuleNotFound:
                pass
            if list_missing and latest is None:
                raise refused or _unknown_module(module, q)
            raise _no_version(module, q)
        if list_missing:
            raise refused or _unknown_module(module, q)
        raise _no_version(module, q)

    def _filter_incompatible(self, module: str, versions: list[str], prefer: bool) -> list[str]:
        """Drop +incompatible versions when the highest compatible one has a real go.mod."""
        if prefer or not any(v.endswith("+incompatible") for v in versions):
            return versions
        compatible = [v for v in versions if not v.endswith("+incompatible")]
        if not compatible:
            return versions
        last = compatible[-1]
        go_mod = self.proxy.go_mod(module, last)
        if go_mod is not None and not _is_synthesized_go_mod(go_mod, module):
            return compatible
        return versions

    @staticmethod
    def _pick(versions: list[str], retractions: Iterable[tuple[str, str]]) -> str | None:
        ranges = list(retractions)
        allowed = [v for v in versions if not _retracted(v, ranges)]
        releases = [v for v in allowed if not is_prerelease(v)]
        if releases:
            return semver_sort(releases)[-1]
        prereleases = [v for v in allowed if is_prerelease(v)]
        if prereleases:
            return semver_sort(prereleases)[-1]
        return None

    def _retractions(self, module: str, versions: list[str]) -> list[tuple[str, str]]:
        """Read retractions from the go.mod of the latest version, as cmd/go does."""
        latest = self._pick(versions, ())
        if latest is None:
            return []
        go_mod = self.proxy.go_mod(module, latest)
        return parse_retractions(go_mod) if go_mod else []


def _is_synthesized_go_mod(go_mod: str, module: str) -> bool:
    return go_mod.strip() in (f"module {module}", f'module "{module}"')


def resolve_spec(
    request: BuildRequest,
    resolver: Resolver,
    *,
    go_version: str,
    sandbox: str,
    tags: tuple[str, ...] = DEFAULT_TAGS,
    ldflags: str = DEFAULT_LDFLAGS,
) -> BuildSpec:
    """Resolve every query in a request and return the BuildSpec to build (and key)."""
    caddy_version = resolver.resolve(CADDY_MODULE, request.caddy_query)
    plugins: list[ResolvedPlugin] = []
    by_module: dict[str, tuple[str, str]] = {CADDY_MODULE: (caddy_version, "Caddy")}
    by_package: set[str] = set()
    for plugin in request.plugins:
        if is_core_package(plugin.path):
            resolved = ResolvedPlugin(plugin.path, CADDY_MODULE, caddy_version)
        else:
            resolved = resolver.resolve_plugin(plugin)
        where = "plugins"
        if resolved.package in by_package:
            raise SpecError(
                where, f"{plugin} names the same package as another plugin: list it once"
            )
        by_package.add(resolved.package)
        seen = by_module.get(resolved.module)
        if seen is not None and seen[0] != resolved.version:
            raise SpecError(
                where,
                f"{plugin} needs {resolved.module}@{resolved.version} but {seen[1]} needs "
                f"{resolved.module}@{seen[0]}: give both the same version",
            )
        by_module[resolved.module] = (resolved.version, str(plugin))
        plugins.append(resolved)
    replacements = [
        Replacement(
            old=r.old,
            new=r.new,
            new_version=resolver.resolve(r.new, r.new_version),
            old_version=r.old_version,
        )
        for r in request.replacements
    ]
    return BuildSpec(
        os=request.os,
        arch=request.arch,
        arm=request.arm,
        caddy_version=caddy_version,
        plugins=tuple(plugins),
        replacements=tuple(replacements),
        go_version=go_version,
        sandbox=sandbox,
        tags=tags,
        ldflags=ldflags,
    )
