"""Turn version queries into absolute versions through the Go module proxy protocol.

`ModuleProxy` speaks the GOPROXY protocol (``$base/$module/@v/list``, ``@v/$version.info``,
``@v/$version.mod``, ``@latest``) over http(s) or against a ``file://`` tree, with Go's
rules for falling through a list of proxies. `Resolver` applies cmd/go's query
semantics on top ("latest", ``v1.2`` prefixes, exact versions, branches and commits,
retractions, ``+incompatible``) and caches answers: absolute versions for good,
moving queries for a short, clock-measured time.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from kiln.errors import SpecError
from kiln.gomod.gomodfile import parse_retractions
from kiln.gomod.module import (
    check_import_path,
    check_module_path,
    check_path_major,
    module_prefixes,
    split_path_version,
)
from kiln.gomod.query import check_version_query, query_kind
from kiln.gomod.semver import (
    canonical_version,
    is_prerelease,
    is_pseudo_version,
    semver_build,
    semver_compare,
    semver_major,
    semver_sort,
)
from kiln.request.spec import (
    CADDY_MODULE,
    DEFAULT_LDFLAGS,
    DEFAULT_TAGS,
    BuildRequest,
    BuildSpec,
    PluginRequest,
    Replacement,
    ResolvedPlugin,
    is_core_package,
)
from kiln.resolve.budget import ProxyLimits
from kiln.resolve.cache import CACHE_MAX_ENTRIES, ResolutionCache
from kiln.resolve.proxy import (
    ModuleNotFound,
    ModuleProxy,
    ModuleRefused,
    _no_version,
    _unknown_module,
)

LATEST_TTL_SECONDS = 300.0
MISSING_TTL_SECONDS = 60.0
#: each request's module-proxy budget when none is given (MAX_PROXY_CALLS, PROXY_DEADLINE_SECONDS)
DEFAULT_LIMITS = ProxyLimits()


# ---------------------------------------------------------------------------
# go.mod retractions
# ---------------------------------------------------------------------------


def _retracted(version: str, ranges: Iterable[tuple[str, str]]) -> bool:
    return any(
        semver_compare(low, version) <= 0 <= semver_compare(high, version) for low, high in ranges
    )


# ---------------------------------------------------------------------------
# Resolution cache
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Resolver
# ---------------------------------------------------------------------------


#: module paths a package path may be looked up under (longest first): real plugins sit a few
#: elements below their module root, and each candidate costs up to three proxy requests
MAX_MODULE_CANDIDATES = 6


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
        limits: ProxyLimits = DEFAULT_LIMITS,
    ) -> None:
        self.proxy = proxy
        #: the module-proxy budget of each request (for_request)
        self.limits = limits
        self.cache = cache
        self.clock = clock
        self.latest_ttl = latest_ttl
        self.missing_ttl = missing_ttl
        # Recent "not found" answers, so probing a package's candidate modules is cheap
        # when the same plugin is asked for again.
        self._missing: OrderedDict[tuple[str, str], tuple[float, ModuleNotFound]] = OrderedDict()
        self._missing_lock = threading.Lock()

    # -- public API --------------------------------------------------------

    def for_request(self) -> Resolver:
        """Return this resolver with a fresh module-proxy budget: one per API request.

        It shares the cache and the recent "not found" answers; only its proxy calls are
        counted and bounded (ProxyCallsExceeded, ProxyDeadlineExceeded).
        """
        bounded = copy.copy(self)
        bounded.proxy = self.proxy.spending(self.limits.start())
        return bounded

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
        if len(candidates) > MAX_MODULE_CANDIDATES:
            # each candidate costs up to three proxy requests: a long made-up path must not
            # make one request cost hundreds
            raise SpecError("plugins", (
                f"{package_path} could be in any of {len(candidates)} modules, and Kiln tries "
                f"at most {MAX_MODULE_CANDIDATES}: name the module itself (module@version), "
                f"or a package at most {MAX_MODULE_CANDIDATES - 1} path elements below it"))
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
