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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

CADDY_MODULE = "github.com/caddyserver/caddy/v2"
# The pre-modules path of Caddy; a pin on it is read as a pin on CADDY_MODULE.
CADDY_LEGACY_MODULE = "github.com/caddyserver/caddy"

SCHEMA_VERSION = 1
DEFAULT_TAGS: tuple[str, ...] = ("nobadger", "nomysql", "nopgx")
DEFAULT_LDFLAGS = "-w -s"
DEFAULT_MAX_PLUGINS = 50

MAX_PATH_LENGTH = 500
MAX_QUERY_LENGTH = 128
MAX_BRANCH_LENGTH = 100
MAX_PLUGIN_TEXT_LENGTH = MAX_PATH_LENGTH + 1 + MAX_QUERY_LENGTH + len("https://") + 1

# (GOOS, GOARCH) -> allowed GOARM values; empty for architectures that take none.
PLATFORMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("linux", "386"): (),
    ("linux", "amd64"): (),
    ("linux", "arm64"): (),
    ("linux", "arm"): ("5", "6", "7"),
    ("linux", "mips"): (),
    ("linux", "mipsle"): (),
    ("linux", "mips64"): (),
    ("linux", "mips64le"): (),
    ("linux", "ppc64"): (),
    ("linux", "ppc64le"): (),
    ("linux", "riscv64"): (),
    ("linux", "s390x"): (),
    ("linux", "loong64"): (),
    ("darwin", "amd64"): (),
    ("darwin", "arm64"): (),
    ("windows", "amd64"): (),
    ("windows", "arm64"): (),
    ("freebsd", "amd64"): (),
    ("freebsd", "arm"): ("6", "7"),
    ("freebsd", "arm64"): (),
    ("openbsd", "amd64"): (),
    ("openbsd", "arm"): ("6", "7"),
    ("openbsd", "arm64"): (),
    ("dragonfly", "amd64"): (),
}
DEFAULT_ARM = "7"

# Platforms people ask for that Go itself can no longer build, with the reason.
_REFUSED_PLATFORMS: dict[tuple[str, str], str] = {
    ("windows", "arm"): "Go no longer builds windows/arm (32-bit); choose windows/arm64",
}

# Hosts whose module roots always have at least three elements (host/owner/repo),
# so shorter prefixes need not be asked about.
_THREE_ELEMENT_HOSTS = frozenset({"github.com", "gitlab.com", "bitbucket.org"})


class SpecError(ValueError):
    """A build request field is invalid; the message says what is wrong and how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


def _show(text: str, limit: int = 80) -> str:
    """Quote text for an error message so control characters and length stay harmless."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=True)


def _plain(text: str) -> str:
    """Show a short identifier as is when it is tame, quoted otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", text):
        return text
    return _show(text, 40)


# ---------------------------------------------------------------------------
# Semantic versions (golang.org/x/mod/semver)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Semver:
    major: str
    minor: str
    patch: str
    short: str
    prerelease: str
    build: str


def _parse_int(v: str) -> tuple[str, str] | None:
    if not v or not ("0" <= v[0] <= "9"):
        return None
    i = 1
    while i < len(v) and "0" <= v[i] <= "9":
        i += 1
    if v[0] == "0" and i != 1:
        return None
    return v[:i], v[i:]


def _is_ident_char(c: str) -> bool:
    return "A" <= c <= "Z" or "a" <= c <= "z" or "0" <= c <= "9" or c == "-"


def _is_bad_num(v: str) -> bool:
    return len(v) > 1 and v.isascii() and v.isdigit() and v[0] == "0"


def _parse_prerelease(v: str) -> tuple[str, str] | None:
    if not v or v[0] != "-":
        return None
    i = start = 1
    while i < len(v) and v[i] != "+":
        if not _is_ident_char(v[i]) and v[i] != ".":
            return None
        if v[i] == ".":
            if start == i or _is_bad_num(v[start:i]):
                return None
            start = i + 1
        i += 1
    if start == i or _is_bad_num(v[start:i]):
        return None
    return v[:i], v[i:]


def _parse_build(v: str) -> tuple[str, str] | None:
    if not v or v[0] != "+":
        return None
    i = start = 1
    while i < len(v):
        if not _is_ident_char(v[i]) and v[i] != ".":
            return None
        if v[i] == ".":
            if start == i:
                return None
            start = i + 1
        i += 1
    if start == i:
        return None
    return v[:i], v[i:]


def _parse_semver(v: str) -> _Semver | None:
    if not v or v[0] != "v":
        return None
    r = _parse_int(v[1:])
    if r is None:
        return None
    major, v = r
    if v == "":
        return _Semver(major, "0", "0", ".0.0", "", "")
    if v[0] != ".":
        return None
    r = _parse_int(v[1:])
    if r is None:
        return None
    minor, v = r
    if v == "":
        return _Semver(major, minor, "0", ".0", "", "")
    if v[0] != ".":
        return None
    r = _parse_int(v[1:])
    if r is None:
        return None
    patch, v = r
    prerelease = build = ""
    if v and v[0] == "-":
        r = _parse_prerelease(v)
        if r is None:
            return None
        prerelease, v = r
    if v and v[0] == "+":
        r = _parse_build(v)
        if r is None:
            return None
        build, v = r
    if v != "":
        return None
    return _Semver(major, minor, patch, "", prerelease, build)


def is_semver(v: str) -> bool:
    """Report whether v is a valid semantic version ("v1", "v1.2" and "v1.2.3-pre+b" all are)."""
    return _parse_semver(v) is not None


def canonical(v: str) -> str:
    """Return the canonical form of v ("v1.2" -> "v1.2.0", build dropped), or "" if invalid."""
    p = _parse_semver(v)
    if p is None:
        return ""
    if p.build:
        return v[: len(v) - len(p.build)]
    if p.short:
        return v + p.short
    return v


def canonical_version(v: str) -> str:
    """Return canonical(v), keeping a "+incompatible" suffix as Go module versions do."""
    c = canonical(v)
    if c and semver_build(v) == "+incompatible":
        c += "+incompatible"
    return c


def semver_major(v: str) -> str:
    """Return the major version prefix of v ("v2" for "v2.1.0"), or "" if invalid."""
    p = _parse_semver(v)
    if p is None:
        return ""
    return v[: 1 + len(p.major)]


def semver_prerelease(v: str) -> str:
    """Return the prerelease suffix of v including the "-", or ""."""
    p = _parse_semver(v)
    return p.prerelease if p else ""


def semver_build(v: str) -> str:
    """Return the build suffix of v including the "+", or ""."""
    p = _parse_semver(v)
    return p.build if p else ""


def is_prerelease(v: str) -> bool:
    """Report whether v is a valid semantic version with a prerelease suffix."""
    return semver_prerelease(v) != ""


def _compare_int(x: str, y: str) -> int:
    if x == y:
        return 0
    if len(x) != len(y):
        return -1 if len(x) < len(y) else 1
    return -1 if x < y else 1


def _compare_prerelease(x: str, y: str) -> int:
    if x == y:
        return 0
    if x == "":
        return 1
    if y == "":
        return -1
    xs = x[1:].split(".")
    ys = y[1:].split(".")
    for dx, dy in zip(xs, ys, strict=False):
        if dx == dy:
            continue
        ix = dx.isascii() and dx.isdigit()
        iy = dy.isascii() and dy.isdigit()
        if ix != iy:
            return -1 if ix else 1
        if ix and len(dx) != len(dy):
            return -1 if len(dx) < len(dy) else 1
        return -1 if dx < dy else 1
    return -1 if len(xs) < len(ys) else 1


def semver_compare(v: str, w: str) -> int:
    """Compare two versions by semver precedence: -1, 0 or +1; an invalid version sorts lowest."""
    pv = _parse_semver(v)
    pw = _parse_semver(w)
    if pv is None and pw is None:
        return 0
    if pv is None:
        return -1
    if pw is None:
        return 1
    for a, b in ((pv.major, pw.major), (pv.minor, pw.minor), (pv.patch, pw.patch)):
        c = _compare_int(a, b)
        if c:
            return c
    return _compare_prerelease(pv.prerelease, pw.prerelease)


class _SemverKey:
    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _SemverKey) -> bool:
        c = semver_compare(self.v, other.v)
        return c < 0 if c else self.v < other.v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SemverKey) and self.v == other.v

    def __hash__(self) -> int:
        return hash(self.v)


def semver_sort(versions: Iterable[str], *, reverse: bool = False) -> list[str]:
    """Sort versions by semver precedence, ties broken by string order, as semver.Sort does."""
    return sorted(versions, key=_SemverKey, reverse=reverse)


_PSEUDO_RE = re.compile(
    r"^v[0-9]+\.(0\.0-|\d+\.\d+-([^+]*\.)?0\.)\d{14}-[A-Za-z0-9]+(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)


def is_pseudo_version(v: str) -> bool:
    """Report whether v is a Go pseudo-version (any of its three forms)."""
    return v.count("-") >= 2 and is_semver(v) and _PSEUDO_RE.match(v) is not None


# ---------------------------------------------------------------------------
# Module and import paths (golang.org/x/mod/module)
# ---------------------------------------------------------------------------

_BAD_WINDOWS_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)

_ALLOWED_HINT = "use only ASCII letters, digits, - . _ ~ and / between elements"


def _first_path_ok(c: str) -> bool:
    return c in "-." or "0" <= c <= "9" or "a" <= c <= "z"


def _mod_path_ok(c: str) -> bool:
    return c in "-._~" or "0" <= c <= "9" or "A" <= c <= "Z" or "a" <= c <= "z"


def _import_path_ok(c: str) -> bool:
    return _mod_path_ok(c) or c == "+"


def _char_problem(c: str) -> str:
    if c == "\x00":
        return "contains a NUL byte"
    if c.isspace():
        return f"contains whitespace ({_show(c)})"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"contains a control character ({_show(c)})"
    if ord(c) >= 0x80:
        return f"contains the non-ASCII character {_show(c)}"
    return f"contains the character {_show(c)}"


def _check_elem(elem: str, kind: Literal["module", "import"]) -> str | None:
    """Return why a path element is invalid, or None (module.checkElem)."""
    if elem == "":
        return "has an empty path element (a doubled or stray /)"
    if elem.count(".") == len(elem):
        return f"has the element {_show(elem)}: . and .. are not allowed"
    if elem[0] == "." and kind == "module":
        return f"has the element {_show(elem)}: an element must not start with a dot"
    if elem[-1] == ".":
        return f"has the element {_show(elem)}: an element must not end with a dot"
    ok = _mod_path_ok if kind == "module" else _import_path_ok
    for c in elem:
        if not ok(c):
            return f"{_char_problem(c)}: {_ALLOWED_HINT}"
    short = elem.split(".", 1)[0]
    if short.upper() in _BAD_WINDOWS_NAMES:
        return f"has the element {_show(elem)}: {short} is a reserved file name on Windows"
    tilde = short.rfind("~")
    if (
        0 <= tilde < len(short) - 1
        and short[tilde + 1 :].isascii()
        and short[tilde + 1 :].isdigit()
    ):
        return f"has the element {_show(elem)}: a trailing ~ and digits looks like a Windows short name"
    return None


def _check_path(path: str, kind: Literal["module", "import"]) -> str | None:
    """Return why path is invalid as a general path, or None (module.checkPath)."""
    if not isinstance(path, str):
        return "is not a string"
    if path == "":
        return "is empty: give a path like github.com/owner/repo"
    if len(path) > MAX_PATH_LENGTH:
        return f"is {len(path)} characters long: at most {MAX_PATH_LENGTH} are allowed"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if path[0] == "-":
        return "starts with a dash: a path must start with a host name"
    if path[0] == "/":
        return "starts with a slash: give a module path like github.com/owner/repo, not a file path"
    if path.endswith("/"):
        return "ends with a slash: remove it"
    # Stricter than Go, which accepts "x..y": Kiln refuses every ".." so that nothing
    # resembling path traversal reaches a shell, a URL or a cache directory.
    if ".." in path:
        return "contains '..': path traversal is not allowed"
    if "//" in path:
        return "has an empty path element (a doubled /)"
    for elem in path.split("/"):
        problem = _check_elem(elem, kind)
        if problem:
            return problem
    return None


def _check_host(path: str) -> str | None:
    """Return why the first element is not a lowercase host name, or None."""
    host = path.split("/", 1)[0]
    if "." not in host:
        return f"must start with a host name containing a dot (like github.com), not {_show(host)}"
    if host[0] == "-":
        return "starts with a dash: a path must start with a host name"
    if any("A" <= c <= "Z" for c in host):
        return f"the host must be lowercase: write {host.lower()}"
    for c in host:
        if not _first_path_ok(c):
            return (
                f"the host {_show(host)} {_char_problem(c)}: use lowercase letters, digits, - and ."
            )
    return None


def split_path_version(path: str) -> tuple[str, str, bool]:
    """Split path into (prefix, path_major, ok), e.g. "x.y/z/v2" -> ("x.y/z", "/v2", True)."""
    if path.startswith("gopkg.in/"):
        return _split_gopkg_in(path)
    i = len(path)
    dot = False
    while i > 0 and ("0" <= path[i - 1] <= "9" or path[i - 1] == "."):
        if path[i - 1] == ".":
            dot = True
        i -= 1
    if i <= 1 or i == len(path) or path[i - 1] != "v" or path[i - 2] != "/":
        return path, "", True
    prefix, path_major = path[: i - 2], path[i - 2 :]
    if dot or len(path_major) <= 2 or path_major[2] == "0" or path_major == "/v1":
        return path, "", False
    return prefix, path_major, True


def _split_gopkg_in(path: str) -> tuple[str, str, bool]:
    if not path.startswith("gopkg.in/"):
        return path, "", False
    i = len(path)
    if path.endswith("-unstable"):
        i -= len("-unstable")
    while i > 0 and "0" <= path[i - 1] <= "9":
        i -= 1
    if i <= 1 or path[i - 1] != "v" or path[i - 2] != ".":
        return path, "", False
    prefix, path_major = path[: i - 2], path[i - 2 :]
    if len(path_major) <= 2 or (path_major[2] == "0" and path_major != ".v0"):
        return path, "", False
    return prefix, path_major, True


def check_path_major(version: str, path_major: str) -> str | None:
    """Return why version does not fit a path's major suffix ("/v2", ".v1", ""), or None."""
    if path_major.startswith(".v") and path_major.endswith("-unstable"):
        path_major = path_major[: -len("-unstable")]
    if version.startswith("v0.0.0-") and path_major == ".v1":
        # Old pseudo-versions for gopkg.in .v1 paths used v0.0.0; Go still accepts them.
        return None
    m = semver_major(version)
    if path_major == "":
        if m in ("v0", "v1") or semver_build(version) == "+incompatible":
            return None
        want = "v0 or v1"
    else:
        if m == path_major[1:]:
            return None
        want = path_major[1:]
    return f"should be {want}, not {m or _show(version)}"


def _major_suffix_problem(path: str) -> str:
    if path.startswith("gopkg.in/"):
        return "a gopkg.in path must end in .vN (like gopkg.in/yaml.v3)"
    last = path.rsplit("/", 1)[-1]
    if last == "v1" or last == "v0":
        return f"ends in /{last}: major versions 0 and 1 have no suffix; drop /{last}"
    return f"ends in /{last}: a major version suffix is /vN with N >= 2 and no leading zero or dots"


def check_module_path(path: str, *, field: str = "module") -> str:
    """Check a Go module path as module.CheckPath does; return it or raise SpecError."""
    problem = _check_path(path, "module") or _check_host(path)
    if problem is None and not split_path_version(path)[2]:
        problem = _major_suffix_problem(path)
    if problem:
        raise SpecError(field, f"module path {_show(str(path))}: {problem}")
    return path


def check_import_path(path: str, *, field: str = "package") -> str:
    """Check a Go package import path as module.CheckImportPath does; return it or raise SpecError."""
    problem = _check_path(path, "import")
    if problem:
        raise SpecError(field, f"package path {_show(str(path))}: {problem}")
    return path


def _check_plugin_path(path: str, field: str) -> str:
    """Check a plugin's package path: an import path under a lowercase host, no bad /vN suffix."""
    problem = _check_path(path, "import") or _check_host(path)
    if problem is None and not split_path_version(path)[2]:
        problem = _major_suffix_problem(path)
    if problem is None and not module_prefixes(path):
        host = path.split("/", 1)[0]
        problem = f"is not inside any module: a {host} module path is {host}/owner/repository"
    if problem:
        raise SpecError(field, f"module path {_show(str(path))}: {problem}")
    return path


def module_prefixes(package_path: str) -> list[str]:
    """Return the prefixes of a package path that could be its module, longest first.

    Only valid module paths are returned. Bare hosts and single owners on hosts such as
    github.com, whose modules always have an owner and a repository, are skipped.
    """
    parts = package_path.split("/")
    shortest = 3 if parts[0] in _THREE_ELEMENT_HOSTS else 1
    out: list[str] = []
    for n in range(len(parts), shortest - 1, -1):
        candidate = "/".join(parts[:n])
        try:
            check_module_path(candidate)
        except SpecError:
            continue
        out.append(candidate)
    return out


# ---------------------------------------------------------------------------
# Version queries
# ---------------------------------------------------------------------------

QueryKind = Literal["latest", "semver", "prefix", "commit", "branch"]

_COMMIT_RE = re.compile(r"[0-9a-f]{7,40}")
_SEMVER_SHAPED_RE = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+[-+]")
_BRANCH_RE = re.compile(r"[A-Za-z0-9._/-]+")
_RESERVED_QUERIES = {
    "none": 'removes a module in Go; leave the plugin out instead, or use "latest"',
    "upgrade": 'depends on a current version Kiln does not have; use "latest"',
    "patch": 'depends on a current version Kiln does not have; use "latest" or a prefix like v1.2',
}


def query_kind(query: str) -> QueryKind:
    """Classify a query already accepted by check_version_query."""
    if query in ("", "latest"):
        return "latest"
    p = _parse_semver(query)
    if p is not None:
        return "prefix" if p.short else "semver"
    if _COMMIT_RE.fullmatch(query):
        return "commit"
    return "branch"


def is_absolute_version(query: str) -> bool:
    """Report whether a query names one immutable version (a full semver or pseudo-version)."""
    return bool(query) and query_kind(query) == "semver"


def check_version_query(query: str | None, *, field: str = "version") -> str:
    """Check a version query and return it normalized ("" becomes "latest"); raise SpecError."""
    if query is None or query == "" or query == "latest":
        return "latest"
    if not isinstance(query, str):
        raise SpecError(field, f"version {_show(str(query))}: must be a string")
    if len(query) > MAX_QUERY_LENGTH:
        raise SpecError(
            field,
            f"version {_show(query)}: {len(query)} characters is too long; at most {MAX_QUERY_LENGTH}",
        )
    if query in _RESERVED_QUERIES:
        raise SpecError(field, f"version {_show(query)} {_RESERVED_QUERIES[query]}")
    if is_semver(query):
        return query
    if _SEMVER_SHAPED_RE.match(query):
        # vX.Y.Z followed by a malformed suffix: a typo, not a branch; say so.
        raise SpecError(
            field,
            f"version {_show(query)} is not a valid semantic version: use vMAJOR.MINOR.PATCH[-pre][+build]",
        )
    for c in query:
        if not (c.isascii() and _BRANCH_RE.fullmatch(c)):
            raise SpecError(
                field,
                f"version {_show(query)} {_char_problem(c)}: a version is latest, vX.Y.Z, vX or vX.Y, "
                "a commit hash, or a branch or tag name of letters, digits, . _ / -",
            )
    if query[0] in "-/":
        raise SpecError(field, f"version {_show(query)} must not start with {query[0]!r}")
    if ".." in query:
        raise SpecError(field, f"version {_show(query)} must not contain '..'")
    if len(query) > MAX_BRANCH_LENGTH:
        raise SpecError(
            field,
            f"version {_show(query)}: a branch or tag name may be at most {MAX_BRANCH_LENGTH} characters",
        )
    return query


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


def _platform_list(os_: str | None = None) -> str:
    keys = sorted(k for k in PLATFORMS if os_ is None or k[0] == os_)
    return ", ".join(f"{o}/{a}" for o, a in keys)


def _arm_choices(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_platform(os: object, arch: object, arm: object = None) -> tuple[str, str, str]:
    """Check a GOOS/GOARCH/GOARM triple against PLATFORMS; return it normalized or raise SpecError."""
    if not isinstance(os, str) or not os.strip():
        raise SpecError("os", f"os is required: choose one of {_platform_list()}")
    if not isinstance(arch, str) or not arch.strip():
        raise SpecError(
            "arch", f"arch is required: choose one of {_platform_list(os.strip().lower())}"
        )
    os_, arch_ = os.strip().lower(), arch.strip().lower()
    if (os_, arch_) in _REFUSED_PLATFORMS:
        raise SpecError("arch", f"{os_}/{arch_} is not offered: {_REFUSED_PLATFORMS[os_, arch_]}")
    if (os_, arch_) not in PLATFORMS:
        known_os = any(k[0] == os_ for k in PLATFORMS)
        raise SpecError(
            "arch" if known_os else "os",
            f"unsupported platform {_plain(os_)}/{_plain(arch_)}: choose one of "
            f"{_platform_list(os_ if known_os else None)}",
        )
    choices = PLATFORMS[os_, arch_]
    if arm is None or (isinstance(arm, str) and arm.strip() == ""):
        return os_, arch_, DEFAULT_ARM if choices else ""
    if isinstance(arm, bool) or not isinstance(arm, str | int):
        raise SpecError("arm", f'arm must be a string like "7", not {type(arm).__name__}')
    arm_ = str(arm).strip()
    if not choices:
        raise SpecError(
            "arm", f"arm={_plain(arm_)} is only for arm builds: leave arm out for {os_}/{arch_}"
        )
    if arm_ not in choices:
        raise SpecError(
            "arm", f"arm={_plain(arm_)} is not valid for {os_}/{arch_}: use {_arm_choices(choices)}"
        )
    return os_, arch_, arm_


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
