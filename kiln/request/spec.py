"""Build requests, their validation, and the canonical spec whose hash is the build key.

A `BuildRequest` is what a client asked for, checked but not resolved: version queries
such as "latest" or a branch are still queries. A `BuildSpec` is what gets built: every
version absolute, plugins sorted, platform and toolchain fixed. Its sha256 is the build key.

The module path and version rules follow golang.org/x/mod (module.CheckPath,
module.CheckImportPath, module.SplitPathVersion, module.CheckPathMajor, semver), so
anything accepted here is also accepted by the go command, and nothing that could
escape a shell, a URL or a directory gets through.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.config import DEFAULT_LDFLAGS, DEFAULT_TAGS
from kiln.errors import SpecError, _show
from kiln.gomod.module import (
    MAX_PATH_LENGTH,
    _check_plugin_path,
    check_import_path,
    check_module_path,
    check_path_major,
    split_path_version,
)
from kiln.gomod.query import MAX_QUERY_LENGTH, check_version_query, query_kind
from kiln.gomod.semver import canonical_version, is_semver, semver_major
from kiln.request.platforms import check_platform

CADDY_MODULE = "github.com/caddyserver/caddy/v2"
# The pre-modules path of Caddy; a pin on it is read as a pin on CADDY_MODULE.
CADDY_LEGACY_MODULE = "github.com/caddyserver/caddy"

SCHEMA_VERSION = 1
DEFAULT_MAX_PLUGINS = 50

MAX_PLUGIN_TEXT_LENGTH = MAX_PATH_LENGTH + 1 + MAX_QUERY_LENGTH + len("https://") + 1


# ---------------------------------------------------------------------------
# Semantic versions (golang.org/x/mod/semver)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Module and import paths (golang.org/x/mod/module)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Version queries
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Plugins and replacements
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginRequest:
    """A requested plugin: a package path and a version query ("latest" when none was given)."""

    path: str
    query: str = "latest"

    def __str__(self) -> str:
        return self.path if self.query == "latest" else f"{self.path}@{self.query}"


@dataclass(frozen=True)
class Replacement:
    """A go.mod replace directive: old[@old_version] => new@new_version (new is a module)."""

    old: str
    new: str
    new_version: str
    old_version: str = ""

    def __str__(self) -> str:
        old = f"{self.old}@{self.old_version}" if self.old_version else self.old
        return f"{old}={self.new}@{self.new_version}"

    def to_dict(self) -> dict[str, str]:
        """Return the replacement as a plain dict."""
        return {
            "old": self.old,
            "old_version": self.old_version,
            "new": self.new,
            "new_version": self.new_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Replacement:
        """Build a replacement from to_dict() output."""
        return cls(
            old=str(data["old"]),
            new=str(data["new"]),
            new_version=str(data["new_version"]),
            old_version=str(data.get("old_version", "")),
        )


def _strip_scheme(text: str) -> str:
    lower = text[:8].lower()
    if lower.startswith("https://"):
        return text[8:]
    if lower.startswith("http://"):
        return text[7:]
    return text


def _check_text(text: object, field: str, what: str) -> str:
    if not isinstance(text, str):
        raise SpecError(field, f"{what} must be a string, not {type(text).__name__}")
    text = text.strip()
    if text == "":
        raise SpecError(field, f"{what} is empty: give a module path like github.com/owner/repo")
    if len(text) > MAX_PLUGIN_TEXT_LENGTH:
        raise SpecError(
            field, f"{what} is {len(text)} characters long: at most {MAX_PLUGIN_TEXT_LENGTH}"
        )
    return text


def _split_at(text: str, field: str, what: str) -> tuple[str, str | None]:
    if text.count("@") > 1:
        raise SpecError(field, f"{what} {_show(text)} has more than one @: write module@version")
    if "@" in text:
        path, version = text.split("@", 1)
        if version == "":
            raise SpecError(
                field, f"{what} {_show(text)} has an empty version after @: give one or drop the @"
            )
        return path, version
    return text, None


def parse_plugin(text: str, *, field: str = "plugin") -> PluginRequest:
    """Parse "module[@version]" into a PluginRequest; raise SpecError if it is not valid."""
    text = _check_text(text, field, "plugin")
    if "=" in text:
        raise SpecError(
            field,
            f"plugin {_show(text)} contains '=': give replacements separately (replace=old=new@version)",
        )
    path, version = _split_at(_strip_scheme(text), field, "plugin")
    if path.endswith("/"):
        path = path[:-1]
    _check_plugin_path(path, field)
    query = check_version_query(version, field=field)
    return PluginRequest(path=path, query=query)


def _refuse_local(side: str, field: str) -> None:
    if (
        side.startswith((".", "/", "~", "\\"))
        or "\\" in side
        or re.match(r"^[A-Za-z]:", side) is not None
    ):
        raise SpecError(
            field,
            f"replacement {_show(side)} is a local path: Kiln builds in a sandbox and can only "
            "replace a module with another module, like github.com/you/fork@v1.2.3",
        )


def parse_replacement(text: str, *, field: str = "replacement") -> Replacement:
    """Parse "old[@v]=new[@v]" into a Replacement; local paths are refused; raise SpecError."""
    text = _check_text(text, field, "replacement")
    if text.count("=") != 1:
        raise SpecError(
            field, f"replacement {_show(text)} must have exactly one '=': write old=new@version"
        )
    old_text, new_text = (part.strip() for part in text.split("="))
    if old_text == "" or new_text == "":
        raise SpecError(field, f"replacement {_show(text)} needs both sides: write old=new@version")
    _refuse_local(new_text, field)
    _refuse_local(old_text, field)
    old, old_version = _split_at(_strip_scheme(old_text), field, "replacement")
    new, new_version = _split_at(_strip_scheme(new_text), field, "replacement")
    old, new = old.rstrip("/"), new.rstrip("/")
    check_module_path(old, field=field)
    check_module_path(new, field=field)
    if old_version is not None:
        if not is_semver(old_version) or canonical_version(old_version) != old_version:
            raise SpecError(
                field,
                f"replacement {_show(text)}: the old version must be an exact version like v1.2.3 "
                f"or left out to replace every version, not {_show(old_version)}",
            )
        problem = check_path_major(old_version, split_path_version(old)[1])
        if problem:
            raise SpecError(
                field, f"replacement {_show(text)}: version {old_version} of {old} {problem}"
            )
    query = check_version_query(new_version, field=field)
    if old == new and (old_version or "") == "":
        raise SpecError(field, f"replacement {_show(text)} replaces {old} with itself: remove it")
    return Replacement(old=old, new=new, new_version=query, old_version=old_version or "")


# ---------------------------------------------------------------------------
# Platform
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Build request
# ---------------------------------------------------------------------------


def _is_core(path: str) -> bool:
    return path in (CADDY_MODULE, CADDY_LEGACY_MODULE)


def is_core_package(path: str) -> bool:
    """Report whether a package path lies inside the Caddy module itself."""
    return path == CADDY_MODULE or path.startswith(CADDY_MODULE + "/")


def _check_caddy_query(query: str, field: str) -> str:
    if query_kind(query) in ("semver", "prefix") and semver_major(query) != "v2":
        raise SpecError(
            field,
            f"Caddy version {_show(query)}: Kiln builds Caddy 2; use a v2 version like v2.8.4",
        )
    return query


@dataclass(frozen=True)
class BuildRequest:
    """A validated build request; version queries are not resolved yet."""

    os: str
    arch: str
    arm: str
    caddy_query: str
    plugins: tuple[PluginRequest, ...] = ()
    replacements: tuple[Replacement, ...] = ()

    @classmethod
    def create(
        cls,
        *,
        os: str,
        arch: str,
        arm: str | int | None = None,
        caddy_version: str | None = None,
        plugins: Iterable[str | PluginRequest] = (),
        replacements: Iterable[str | Replacement] = (),
        max_plugins: int = DEFAULT_MAX_PLUGINS,
    ) -> BuildRequest:
        """Validate every field of a build request and return it; raise SpecError on the first problem."""
        os_, arch_, arm_ = check_platform(os, arch, arm)
        caddy_given = caddy_version is not None and caddy_version != ""
        caddy_query = _check_caddy_query(
            check_version_query(caddy_version, field="caddy_version"), "caddy_version"
        )

        plugin_items = _bounded_list(plugins, max_plugins, "plugins")
        core_pin: str | None = None
        seen: set[str] = set()
        parsed: list[tuple[str, PluginRequest]] = []
        for i, item in enumerate(plugin_items):
            fld = f"plugins[{i}]"
            plugin = _plugin_item(item, fld)
            key = CADDY_MODULE if _is_core(plugin.path) else plugin.path
            if key in seen:
                raise SpecError(
                    fld, f"{plugin.path} is listed twice: list each plugin once, with one version"
                )
            seen.add(key)
            if not _is_core(plugin.path):
                parsed.append((fld, plugin))
                continue
            query = _check_caddy_query(plugin.query, fld)
            if caddy_given and query not in ("latest", caddy_query):
                raise SpecError(
                    fld,
                    f"{plugin} pins Caddy to {query} but caddy_version is {caddy_query}: "
                    "give Caddy's version once",
                )
            core_pin = query
        if core_pin is not None and not caddy_given:
            caddy_query = core_pin
        for fld, plugin in parsed:
            if is_core_package(plugin.path) and plugin.query not in ("latest", caddy_query):
                raise SpecError(
                    fld,
                    f"{plugin.path} is part of Caddy itself and is built at Caddy's version: "
                    f"drop @{plugin.query}, or set caddy_version instead",
                )

        replacement_items = _bounded_list(replacements, max_plugins, "replacements")
        reps: list[Replacement] = []
        seen_reps: set[tuple[str, str]] = set()
        for i, item in enumerate(replacement_items):
            fld = f"replacements[{i}]"
            rep = _replacement_item(item, fld)
            rep_key = (rep.old, rep.old_version)
            if rep_key in seen_reps:
                raise SpecError(
                    fld, f"{rep.old} is replaced twice: give one replacement per module"
                )
            seen_reps.add(rep_key)
            reps.append(rep)

        return cls(
            os=os_,
            arch=arch_,
            arm=arm_,
            caddy_query=caddy_query,
            plugins=tuple(sorted((p for _, p in parsed), key=lambda p: p.path)),
            replacements=tuple(sorted(reps, key=lambda r: (r.old, r.old_version))),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the request as plain JSON-able data."""
        return {
            "os": self.os,
            "arch": self.arch,
            "arm": self.arm,
            "caddy_version": self.caddy_query,
            "plugins": [str(p) for p in self.plugins],
            "replacements": [str(r) for r in self.replacements],
        }


def _bounded_list(items: Iterable[Any], limit: int, field: str) -> list[Any]:
    if isinstance(items, str | bytes | PluginRequest | Replacement):
        items = [items]
    out = list(items)
    if len(out) > limit:
        raise SpecError(field, f"too many {field} ({len(out)}): at most {limit} per build")
    return out


def _plugin_item(item: str | PluginRequest, field: str) -> PluginRequest:
    if isinstance(item, PluginRequest):
        return parse_plugin(str(item), field=field)
    return parse_plugin(item, field=field)


def _replacement_item(item: str | Replacement, field: str) -> Replacement:
    if isinstance(item, Replacement):
        item = str(item)
    return parse_replacement(item, field=field)


# ---------------------------------------------------------------------------
# Resolved build spec
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedPlugin:
    """A plugin at an absolute version: the package main.go imports and the module to go get."""

    package: str
    module: str
    version: str

    def to_dict(self) -> dict[str, str]:
        """Return the plugin as a plain dict."""
        return {"package": self.package, "module": self.module, "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolvedPlugin:
        """Build a plugin from to_dict() output."""
        return cls(
            package=str(data["package"]), module=str(data["module"]), version=str(data["version"])
        )


_GO_VERSION_RE = re.compile(r"go[1-9][0-9]*(\.(0|[1-9][0-9]*)){1,2}((rc|beta)[1-9][0-9]*)?")
_TAG_RE = re.compile(r"[A-Za-z0-9_.]+")
_LDFLAGS_RE = re.compile(r"[A-Za-z0-9 _.=/-]*")


def _check_absolute(version: str, what: str) -> None:
    if not is_semver(version) or canonical_version(version) != version:
        raise SpecError("spec", f"{what} version {_show(version)} is not an absolute version")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a build's bytes; its sha256 is the build key."""

    os: str
    arch: str
    arm: str
    caddy_version: str
    plugins: tuple[ResolvedPlugin, ...]
    replacements: tuple[Replacement, ...]
    go_version: str
    sandbox: str
    tags: tuple[str, ...] = DEFAULT_TAGS
    ldflags: str = DEFAULT_LDFLAGS
    trimpath: bool = True
    _key: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plugins = tuple(sorted(self.plugins, key=lambda p: (p.package, p.module, p.version)))
        reps = tuple(
            sorted(self.replacements, key=lambda r: (r.old, r.old_version, r.new, r.new_version))
        )
        object.__setattr__(self, "plugins", plugins)
        object.__setattr__(self, "replacements", reps)
        object.__setattr__(self, "tags", tuple(self.tags))
        self._validate()
        object.__setattr__(self, "_key", hashlib.sha256(self.canonical_json().encode()).hexdigest())

    def _validate(self) -> None:
        os_, arch_, arm_ = check_platform(self.os, self.arch, self.arm or None)
        if (os_, arch_, arm_) != (self.os, self.arch, self.arm):
            raise SpecError(
                "spec", f"platform {self.os}/{self.arch} arm={self.arm!r} is not normalized"
            )
        _check_absolute(self.caddy_version, "Caddy")
        _check_caddy_query(self.caddy_version, "spec")
        packages: set[str] = set()
        for p in self.plugins:
            check_import_path(p.package, field="spec")
            check_module_path(p.module, field="spec")
            if p.package != p.module and not p.package.startswith(p.module + "/"):
                raise SpecError("spec", f"package {p.package} is not inside module {p.module}")
            _check_absolute(p.version, p.module)
            if p.package in packages:
                raise SpecError("spec", f"package {p.package} appears twice")
            packages.add(p.package)
        for r in self.replacements:
            check_module_path(r.old, field="spec")
            check_module_path(r.new, field="spec")
            _check_absolute(r.new_version, r.new)
            if r.old_version:
                _check_absolute(r.old_version, r.old)
        if not _GO_VERSION_RE.fullmatch(self.go_version):
            raise SpecError("spec", f"go_version {_show(self.go_version)} is not like go1.25.3")
        if not self.sandbox or len(self.sandbox) > 300 or not self.sandbox.isprintable():
            raise SpecError("spec", "sandbox identity must be a non-empty printable string")
        for tag in self.tags:
            if not _TAG_RE.fullmatch(tag):
                raise SpecError("spec", f"build tag {_show(tag)} is not valid")
        if not _LDFLAGS_RE.fullmatch(self.ldflags):
            raise SpecError("spec", f"ldflags {_show(self.ldflags)} contain unexpected characters")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain JSON-able data, with the schema version."""
        return {
            "v": SCHEMA_VERSION,
            "os": self.os,
            "arch": self.arch,
            "arm": self.arm,
            "caddy_version": self.caddy_version,
            "plugins": [p.to_dict() for p in self.plugins],
            "replacements": [r.to_dict() for r in self.replacements],
            "go_version": self.go_version,
            "sandbox": self.sandbox,
            "tags": list(self.tags),
            "ldflags": self.ldflags,
            "trimpath": self.trimpath,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildSpec:
        """Rebuild a spec from to_dict() output; raise SpecError if it is not a valid spec."""
        if data.get("v") != SCHEMA_VERSION:
            raise SpecError(
                "spec", f"unknown spec schema version {data.get('v')!r}: expected {SCHEMA_VERSION}"
            )
        try:
            return cls(
                os=str(data["os"]),
                arch=str(data["arch"]),
                arm=str(data["arm"]),
                caddy_version=str(data["caddy_version"]),
                plugins=tuple(ResolvedPlugin.from_dict(p) for p in data["plugins"]),
                replacements=tuple(Replacement.from_dict(r) for r in data["replacements"]),
                go_version=str(data["go_version"]),
                sandbox=str(data["sandbox"]),
                tags=tuple(str(t) for t in data["tags"]),
                ldflags=str(data["ldflags"]),
                trimpath=bool(data["trimpath"]),
            )
        except (KeyError, TypeError) as exc:
            raise SpecError("spec", f"spec is missing or mistypes a field: {exc}") from None

    def canonical_json(self) -> str:
        """Return the spec as JSON with sorted keys and no whitespace: the bytes the key hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def key(self) -> str:
        """Return the build key: the sha256 hex digest of canonical_json()."""
        return self._key

    @property
    def filename(self) -> str:
        """Return the download name, caddy_<os>_<arch>_custom (.exe on Windows)."""
        name = f"caddy_{self.os}_{self.arch}_custom"
        return name + ".exe" if self.os == "windows" else name

    def goenv(self) -> dict[str, str]:
        """Return GOOS, GOARCH and, for arm, GOARM."""
        env = {"GOOS": self.os, "GOARCH": self.arch}
        if self.arm:
            env["GOARM"] = self.arm
        return env
