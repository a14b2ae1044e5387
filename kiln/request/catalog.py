"""The plugin catalog: what /api/packages lists and what ``plugins.allow: registered`` admits.

caddyserver.com keeps a registry of plugin *packages* (import paths), each with the Caddy
modules it registers. Kiln reads a catalog of the same shape from a file the operator
keeps (``plugins.catalog_file``), from a copy of an upstream /api/packages that the janitor
mirrors into the database (``plugins.catalog_url``), or both; the file's entries win.

Clients name plugins in more ways than the catalog lists them, so requests are mapped:

- a module root whose registered packages live in subpackages (``caddy upgrade`` sends
  module paths, e.g. ``example.com/dns/v2`` for ``example.com/dns/v2/providers/x``)
  becomes those packages, at the version asked for; without this the upgraded binary
  would silently lose the plugin;
- ``base@v2.x`` matches a package registered as ``base/v2`` and the other way round: a
  path is also compared without its module root's trailing ``/vN``, as Go allows a major
  version only there (``spellings``);
- a Caddy module ID (``dns.providers.x``) becomes the one package that registers it.

With ``plugins.allow: registered`` only what the catalog registers is built: a registered
package, a package inside one, or one of these in another major version of its module. A
replacement's target must be a module a registered package can lie in. A ``/vN`` element
is never compared away where it names an owner or a repository (``github.com/v2/x``,
``github.com/x/v2``): that path is other code, not a major version of a registered one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import yaml

from kiln.errors import KilnError, SpecError
from kiln.gomod.module import check_module_path, module_prefixes, split_path_version
from kiln.request.spec import (
    DEFAULT_MAX_PLUGINS,
    BuildRequest,
    PluginRequest,
    Replacement,
    is_core_package,
    parse_plugin,
)


class CatalogStore(Protocol):
    """Where the catalog's mirror and download counts live (kiln/db/catalog.py)."""

    def get_mirror(self, source: str) -> dict[str, Any] | None: ...

    def package_downloads(self) -> dict[str, int]: ...

log = logging.getLogger(__name__)

#: seconds one request for the upstream catalog may take
MIRROR_TIMEOUT_SECONDS = 30.0
#: largest upstream catalog accepted (caddyserver.com's is a few MB)
MIRROR_MAX_BYTES = 64 * 1024 * 1024
USER_AGENT = "kiln (plugin catalog mirror)"
#: seconds a catalog is reused by default
CATALOG_TTL_SECONDS = 60.0

#: packages a mapping error lists before it stops
SHOWN_PACKAGES = 3
#: /vN elements of a path that are tried as the end of its module root; a path with more
#: (Go paths have one, rarely two) is matched only as written, which bounds the work
MAX_MAJOR_ELEMENTS = 4


class CatalogError(KilnError, ValueError):
    """A catalog document is not in /api/packages' shape; the message says where."""


class CatalogUnavailable(KilnError):
    """The catalog cannot be read now (and none was read before): the API answers 503."""


class PackageNotRegistered(SpecError):
    """A plugin is not in the catalog while ``plugins.allow`` is ``registered``."""


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogModule:
    """A Caddy module a package registers."""

    name: str
    docs: str
    package: str
    repo: str

    def to_dict(self) -> dict[str, str]:
        """Return the module in /api/packages' shape."""
        return {"name": self.name, "docs": self.docs, "package": self.package,
                "repo": self.repo}


@dataclass(frozen=True)
class Package:
    """One catalog entry: a plugin package and the Caddy modules it registers."""

    id: str
    path: str
    repo: str
    downloads: int = 0
    listed: bool = True
    available: bool = True
    published: str | None = None
    updated: str | None = None
    modules: tuple[CatalogModule, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the entry in /api/packages' shape."""
        return {
            "id": self.id, "path": self.path, "repo": self.repo,
            "downloads": self.downloads, "listed": self.listed, "available": self.available,
            "published": self.published, "updated": self.updated,
            "modules": [m.to_dict() for m in self.modules],
        }

    @property
    def paths(self) -> list[str]:
        """Return the package path and the packages of its modules, each once."""
        out = [self.path]
        out += [m.package for m in self.modules if m.package not in out]
        return out


def _package_path(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CatalogError(f"{what} must be a string")
    try:
        plugin = parse_plugin(value, field=what)
    except SpecError as exc:
        raise CatalogError(f"{what}: {exc}") from None
    if plugin.query != "latest":
        raise CatalogError(f"{what} {value!r} must be a package path without @version")
    return plugin.path


def _text(item: dict[str, Any], name: str, default: str | None) -> str | None:
    value = item.get(name, default)
    if value is not None and not isinstance(value, str):
        raise CatalogError(f"{name} must be a string")
    return value if value is not None else default


def _flag(item: dict[str, Any], name: str) -> bool:
    value = item.get(name, True)
    if not isinstance(value, bool):
        raise CatalogError(f"{name} must be true or false")
    return value


def parse_package(item: object) -> Package:
    """Return one /api/packages entry as a Package; raise CatalogError if malformed."""
    if not isinstance(item, dict):
        raise CatalogError("a package must be an object with at least a path")
    path = _package_path(item.get("path"), "path")
    repo = _text(item, "repo", None) or f"https://{path}"
    downloads = item.get("downloads", 0)
    if isinstance(downloads, bool) or not isinstance(downloads, int | float) or downloads < 0:
        raise CatalogError(f"{path}: downloads must be a number >= 0")
    modules = []
    raw_modules = item.get("modules") or []
    if not isinstance(raw_modules, list):
        raise CatalogError(f"{path}: modules must be a list")
    for raw in raw_modules:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise CatalogError(f"{path}: each module needs a name")
        package = raw.get("package") or path
        modules.append(CatalogModule(
            name=raw["name"], docs=str(raw.get("docs") or ""),
            package=_package_path(package, f"{path}: module {raw['name']}'s package"),
            repo=str(raw.get("repo") or repo)))
    return Package(
        id=_text(item, "id", None) or str(uuid.uuid5(uuid.NAMESPACE_URL, path)),
        path=path, repo=repo, downloads=int(downloads),
        listed=_flag(item, "listed"), available=_flag(item, "available"),
        published=_text(item, "published", None), updated=_text(item, "updated", None),
        modules=tuple(modules),
    )


def parse_packages(data: object, *, source: str, strict: bool) -> list[Package]:
    """Read ``{"result": [...]}`` or a bare list of packages.

    ``strict`` (an operator's file) refuses any bad entry; otherwise (an upstream mirror)
    bad entries are skipped with a warning. A later entry for a path wins.
    """
    items = data.get("result") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise CatalogError(f"{source}: expected {{\"result\": [packages]}} or a list of "
                           "packages, as /api/packages answers")
    found: dict[str, Package] = {}
    for number, item in enumerate(items, 1):
        try:
            package = parse_package(item)
        except CatalogError as exc:
            if strict:
                raise CatalogError(f"{source}: package #{number}: {exc}") from None
            log.warning("%s: skipping package #%d: %s", source, number, exc)
            continue
        found[package.path] = package
    return list(found.values())


def read_catalog_file(path: Path) -> list[Package]:
    """Read an operator's catalog file (JSON, or YAML for .yml/.yaml); raise CatalogError."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text) if path.suffix in (".yml", ".yaml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if path.suffix in (".yml", ".yaml") else "JSON"
        raise CatalogError(f"{path}: not valid {kind}: {exc}") from None
    return parse_packages(data, source=str(path), strict=True)


# ---------------------------------------------------------------------------
# Matching requests to packages
# ---------------------------------------------------------------------------


def _owned_root(parts: list[str]) -> bool:
    """Report whether a path (split at /) can be a module root that names its owner.

    On github.com, gitlab.com and bitbucket.org that is host/owner/repository or deeper
    (module_prefixes' rule); elsewhere at least host/element, since a forge Kiln does not
    know may give the element after the host to anybody.
    """
    head = "/".join(parts[:3])
    return len(parts) >= 2 and head in module_prefixes(head)


def _is_major(element: str) -> bool:
    """Report whether a path element is a major version suffix (v2, v10; not v0, v1, v02)."""
    return split_path_version(f"x/{element}")[1] == f"/{element}"


def spellings(path: str) -> list[str]:
    """Return ``path``, then each spelling of it without a module root's trailing /vN.

    Go puts a major version only at the end of a module root (``base/v2``), so only
    ``github.com/a/b/v2/sub`` is also spelled ``github.com/a/b/sub``; a /vN anywhere else
    (``github.com/v2/a/b``, ``github.com/a/v2/b``) names an owner or a repository and stays.
    """
    parts = path.split("/")
    majors = [k for k in range(2, len(parts)) if _is_major(parts[k])]
    if len(majors) > MAX_MAJOR_ELEMENTS:
        return [path]
    out = [path]
    for k in reversed(majors):
        try:
            check_module_path("/".join(parts[:k + 1]))
        except SpecError:
            continue
        if _owned_root(parts[:k]):
            out.append("/".join(parts[:k] + parts[k + 1:]))
    return out


def _starts_major(rest: str) -> bool:
    """Report whether a path below a module's base begins with a major version (v2/...)."""
    return _is_major(rest.split("/", 1)[0])


class CatalogIndex:
    """The packages of a catalog, indexed for matching request paths."""

    def __init__(self, packages: Iterable[Package]) -> None:
        self.packages = list(packages)
        #: every spelling of every registered package path -> (real path, its entry)
        self._by_spelling: dict[str, tuple[str, Package]] = {}
        #: every path above a registered spelling -> (that spelling, its real path)
        self._below: dict[str, list[tuple[str, str]]] = {}
        self._by_module: dict[str, set[str]] = {}
        for package in self.packages:
            for path in package.paths:
                # a registered path is found as itself before another's spelling of it
                self._by_spelling[path] = (path, package)
        for package in self.packages:
            for path in package.paths:
                for spelling in spellings(path)[1:]:
                    self._by_spelling.setdefault(spelling, (path, package))
            for module in package.modules:
                self._by_module.setdefault(module.name, set()).add(module.package)
        for spelling, (real, _) in self._by_spelling.items():
            parts = spelling.split("/")
            for cut in range(1, len(parts)):
                self._below.setdefault("/".join(parts[:cut]), []).append((spelling, real))

    def find(self, path: str) -> Package | None:
        """Return the entry registering ``path`` or a package it lies inside, if any.

        ``path`` may name the package in another major version of its module.
        """
        for spelling in spellings(path):
            parts = spelling.split("/")
            for cut in range(len(parts), 0, -1):
                hit = self._by_spelling.get("/".join(parts[:cut]))
                if hit is not None:
                    return hit[1]
        return None

    def inside(self, path: str) -> list[str]:
        """Return the registered packages lying strictly inside module ``path``, sorted,
        each spelled from ``path`` down (so it keeps the major version ``path`` names)."""
        found: set[str] = set()
        for spelling in spellings(path):
            for registered, real in self._below.get(spelling, ()):
                if real.startswith(path + "/"):
                    found.add(real)
                elif not _starts_major(registered[len(spelling) + 1:]):
                    # the request's spelling carries the major version it asked for
                    found.add(path + registered[len(spelling):])
        return sorted(found)

    def holds_module(self, path: str) -> bool:
        """Report whether module ``path`` is one a registered package can lie in.

        That is a registered package itself, or a module root above one that names its
        owner, in any major version; a prefix above the owner (``github.com/a`` for
        ``github.com/a/plug``) or a module below a registered package is not.
        """
        return _owned_root(path.split("/")) and any(
            spelling in self._by_spelling or spelling in self._below
            for spelling in spellings(path))

    def module_package(self, path: str) -> str | None:
        """Return the one package registering Caddy module ID ``path``, if it is one."""
        found = self._by_module.get(path)
        if "/" not in path and found and len(found) == 1:
            return next(iter(found))
        return None

    def map_plugin(self, plugin: PluginRequest) -> list[PluginRequest]:
        """Return the packages a requested plugin stands for (itself when unknown)."""
        path = plugin.path
        named = self.module_package(path)
        if named is not None:
            log.info("plugin %s is a Caddy module ID; building its package %s", path, named)
            return [PluginRequest(named, plugin.query)]
        if self.find(path) is not None:
            return [plugin]
        inner = self.inside(path)
        return [PluginRequest(real, plugin.query) for real in inner] or [plugin]

    def map_request(self, request: BuildRequest, *,
                    max_plugins: int = DEFAULT_MAX_PLUGINS) -> BuildRequest:
        """Return the request with every plugin mapped to the packages it stands for.

        A SpecError is raised when they are more than ``max_plugins``: one module path
        can stand for many registered packages.
        """
        plugins: list[PluginRequest] = []
        stands_for: dict[str, list[str]] = {}
        for plugin in request.plugins:
            for mapped in self.map_plugin(plugin):
                if mapped not in plugins:
                    plugins.append(mapped)
                if mapped.path != plugin.path:
                    stands_for.setdefault(plugin.path, []).append(mapped.path)
        if plugins == list(request.plugins):
            return request
        # a request the API took at its size is never refused for it, only for growing
        limit = max(max_plugins, len(request.plugins))
        if len(plugins) > limit:
            raise SpecError("plugins", _too_many(len(plugins), limit, stands_for))
        return BuildRequest.create(
            os=request.os, arch=request.arch, arm=request.arm or None,
            caddy_version=request.caddy_query, plugins=[str(p) for p in plugins],
            replacements=[str(r) for r in request.replacements],
            max_plugins=max(limit, len(request.replacements)),
        )

    def check(self, request: BuildRequest) -> None:
        """Refuse a plugin (or replacement target) the catalog does not register."""
        for i, plugin in enumerate(request.plugins):
            if is_core_package(plugin.path):
                continue
            entry = self.find(plugin.path)
            if entry is None:
                raise PackageNotRegistered(f"plugins[{i}]", not_registered(plugin.path))
            if not entry.available:
                raise PackageNotRegistered(
                    f"plugins[{i}]", f"{plugin.path} is registered but not available for "
                    "builds now (its catalog entry says available: false)")
        for i, replacement in enumerate(request.replacements):
            if not is_core_package(replacement.new) and not self.holds_module(replacement.new):
                raise PackageNotRegistered(f"replacements[{i}]", _replacement_refused(replacement))


def _too_many(count: int, limit: int, stands_for: dict[str, list[str]]) -> str:
    path, inner = max(stands_for.items(), key=lambda item: len(item[1]))
    shown = ", ".join(inner[:SHOWN_PACKAGES]) + (", ..." if len(inner) > SHOWN_PACKAGES else "")
    return (f"the plugins asked for stand for {count} catalog packages ({path} is {shown}: "
            f"{len(inner)} packages), and this server builds at most {limit} plugins per "
            "build: name the packages you need")


def not_registered(path: str) -> str:
    """Return the message for a package outside the catalog (caddyserver.com's words first)."""
    return (f"{path} is not a registered Caddy module package path: this server builds only "
            "the packages its catalog lists (GET /api/packages); check the path, or ask the "
            "operator to add it")


def _replacement_refused(replacement: Replacement) -> str:
    return (f"replacement {replacement}: {replacement.new} is not a registered Caddy module "
            "package path, and this server builds only registered code (GET /api/packages)")


# ---------------------------------------------------------------------------
# Storage of the mirror
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The catalog an API process serves
# ---------------------------------------------------------------------------


class Catalog:
    """The merged catalog (mirror + file + Kiln's own download counts), re-read every ttl."""

    def __init__(self, *, store: CatalogStore | None, file: Path | None = None,
                 url: str = "", ttl: float = CATALOG_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.file = file
        self.url = url
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded: tuple[float, CatalogIndex] | None = None
        self._file_cache: tuple[float, list[Package]] | None = None

    def packages(self) -> list[Package]:
        """Return every catalog entry, with Kiln's downloads added to the counts."""
        return self.index().packages

    def index(self) -> CatalogIndex:
        """Return the current catalog, reading it again once ttl seconds have passed."""
        with self._lock:
            loaded = self._loaded
            if loaded is not None and self.clock() - loaded[0] < self.ttl:
                return loaded[1]
            try:
                index = self._load()
            except (CatalogError, psycopg.Error, OSError) as exc:
                if loaded is None:
                    raise CatalogUnavailable(f"the plugin catalog cannot be read now: {exc}") from None
                log.warning("plugin catalog not refreshed, serving the last copy: %s", exc)
                index = loaded[1]
            self._loaded = (self.clock(), index)
            return index

    def _read_file(self) -> list[Package]:
        assert self.file is not None
        mtime = self.file.stat().st_mtime
        if self._file_cache is None or self._file_cache[0] != mtime:
            self._file_cache = (mtime, read_catalog_file(self.file))
        return self._file_cache[1]

    def _load(self) -> CatalogIndex:
        merged: dict[str, Package] = {}
        if self.url and self.store is not None:
            row = self.store.get_mirror(self.url)
            if row is not None:
                for package in parse_packages(row["packages"], source=self.url, strict=False):
                    merged[package.path] = package
        if self.file is not None:
            for package in self._read_file():
                merged[package.path] = package
        index = CatalogIndex(merged.values())
        if self.store is None or not merged:
            return index
        extra: dict[str, int] = {}
        for path, count in self.store.package_downloads().items():
            entry = index.find(path)
            if entry is not None:
                extra[entry.path] = extra.get(entry.path, 0) + count
        if not extra:
            return index
        return CatalogIndex(dataclasses.replace(p, downloads=p.downloads + extra.get(p.path, 0))
                            for p in index.packages)


class CatalogPolicy:
    """Map a request's plugins to catalog packages, and refuse unregistered ones when
    ``plugins.allow`` is ``registered``."""

    def __init__(self, catalog: Catalog, *, allow: str = "any",
                 max_plugins: int = DEFAULT_MAX_PLUGINS) -> None:
        self.catalog = catalog
        self.allow = allow
        #: plugins a request may stand for once mapped (build.max_plugins)
        self.max_plugins = max_plugins

    def admit(self, request: BuildRequest) -> BuildRequest:
        """Return the request with its plugins mapped; PackageNotRegistered if refused."""
        try:
            index = self.catalog.index()
        except CatalogUnavailable:
            if self.allow == "registered":
                raise
            log.warning("plugin catalog unavailable; building plugins as named", exc_info=True)
            return request
        mapped = index.map_request(request, max_plugins=self.max_plugins)
        if self.allow == "registered":
            index.check(mapped)
        return mapped

