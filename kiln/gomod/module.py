"""Module and import paths as Go checks them (golang.org/x/mod/module), and the proxy's case encoding."""

from __future__ import annotations

import re
from typing import Literal

from kiln.errors import SpecError, _show
from kiln.gomod.semver import semver_build, semver_major

MAX_PATH_LENGTH = 500
# Hosts whose module roots always have at least three elements (host/owner/repo),
# so shorter prefixes need not be asked about.
_THREE_ELEMENT_HOSTS = frozenset({"github.com", "gitlab.com", "bitbucket.org"})
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
