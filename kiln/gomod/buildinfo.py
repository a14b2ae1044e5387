"""Go build information: what a Go binary records about how it was built.

Two sources give the same ``BuildInfo``: the output of ``go version -m FILE`` (the worker
reads its builds that way, in the sandbox) and the binary itself, read here in pure Python
so that a machine without Go can tell which Caddy and plugins a ``caddy`` file holds
(``kiln upgrade``). The binary holds a 32-byte header starting ``\\xff Go buildinf:``,
16-byte aligned; since Go 1.18 (flags bit 2 set) the Go version and the module information
follow it inline, each as a uvarint length and the bytes, and the module information is
framed by two 16-byte sentinels. It is the text ``runtime/debug.BuildInfo.String()`` prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import KilnError

MAGIC = b"\xff Go buildinf:"
#: the header is aligned in the data segment, which keeps the alignment in the file
ALIGN = 16
HEADER_SIZE = 32
FLAGS_OFFSET = 15
#: flags bit: the version and module information follow the header inline (Go >= 1.18)
FLAG_INLINE = 0x2
#: cmd/go frames the module information with sentinels of this size at each end
SENTINEL_SIZE = 16
#: a uvarint of a length takes at most this many bytes
MAX_UVARINT_BYTES = 10
#: the Go function name of a package's ``func init`` (``pkg.init.0``), NUL-terminated as
#: the function name table stores it
INIT_SUFFIX = b".init.0\x00"
#: bytes an import path may hold in a function name (its last element's dots as %2e)
_PATH_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+%/")


class NotGoBinary(KilnError, ValueError):
    """The file holds no Go build information that can be read."""


@dataclass(frozen=True)
class GoModule:
    path: str
    version: str
    sum: str = ""
    replace: GoModule | None = None


@dataclass(frozen=True)
class BuildInfo:
    """What ``go version -m`` reads from a Go binary."""

    go_version: str
    path: str = ""
    main: GoModule | None = None
    deps: tuple[GoModule, ...] = ()
    settings: tuple[tuple[str, str], ...] = field(default=())

    def setting(self, name: str) -> str | None:
        """Return one build setting (``-ldflags``, ``GOOS``, ...), or None."""
        return next((v for k, v in self.settings if k == name), None)

    def dep(self, path: str) -> GoModule | None:
        """Return the dependency with this module path, or None."""
        return next((m for m in self.deps if m.path == path), None)

    def module_of(self, package: str) -> GoModule | None:
        """Return the dependency holding a package: the longest module path that prefixes it."""
        found: GoModule | None = None
        for module in self.deps:
            inside = package == module.path or package.startswith(module.path + "/")
            if inside and (found is None or len(module.path) > len(found.path)):
                found = module
        return found


def parse_build_info(text: str, *, go_version: str = "") -> BuildInfo:
    """Parse ``runtime/debug.BuildInfo.String()`` text (tab-separated, one item a line)."""
    path, main = "", None
    deps: list[GoModule] = []
    settings: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.split("\t")
        kind, rest = parts[0], parts[1:]
        if kind == "go" and rest and not go_version:
            go_version = rest[0].strip()
        elif kind == "path" and rest:
            path = rest[0]
        elif kind == "mod" and rest:
            main = GoModule(rest[0], rest[1] if len(rest) > 1 else "", _at(rest, 2))
        elif kind == "dep" and len(rest) >= 2:
            deps.append(GoModule(rest[0], rest[1], _at(rest, 2)))
        elif kind == "=>" and rest:
            replaced = GoModule(rest[0], _at(rest, 1), _at(rest, 2))
            if deps:
                last = deps.pop()
                deps.append(GoModule(last.path, last.version, last.sum, replaced))
            elif main is not None:
                main = GoModule(main.path, main.version, main.sum, replaced)
        elif kind == "build" and rest:
            name, _, value = rest[0].partition("=")
            settings.append((name, _unquote(value)))
    return BuildInfo(go_version=go_version, path=path, main=main, deps=tuple(deps),
                     settings=tuple(settings))


def parse_go_version_m(output: str) -> BuildInfo:
    """Parse the output of ``go version -m FILE``; raise ValueError if it is not that."""
    lines = output.splitlines()
    head = next((line for line in lines if line and not line.startswith("\t")), "")
    _, sep, go_version = head.rpartition(": ")
    if not sep or not go_version.startswith("go"):
        raise ValueError(f"not go version -m output: {head[:200]!r}")
    body = "\n".join(line[1:] for line in lines if line.startswith("\t"))
    return parse_build_info(body, go_version=go_version.strip())


def _at(items: list[str], index: int) -> str:
    return items[index].strip() if len(items) > index else ""


def _unquote(value: str) -> str:
    # values with spaces or quotes are quoted the way strconv.Quote does
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            loaded = json.loads(value)
        except ValueError:
            return value[1:-1]
        return loaded if isinstance(loaded, str) else value
    return value


# -- the binary ----------------------------------------------------------------------------


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode an unsigned varint at ``pos``; return it and the position after it."""
    value = shift = 0
    for i in range(pos, min(pos + MAX_UVARINT_BYTES, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise NotGoBinary("a length in the build information is cut off")


def _inline_string(data: bytes, pos: int) -> tuple[bytes, int]:
    length, start = _uvarint(data, pos)
    end = start + length
    if end > len(data):
        raise NotGoBinary("a string in the build information runs past the end of the file")
    return data[start:end], end


def _decode_at(data: bytes, at: int) -> BuildInfo:
    header = data[at:at + HEADER_SIZE]
    if len(header) < HEADER_SIZE:
        raise NotGoBinary("the build information header is cut off")
    if not header[FLAGS_OFFSET] & FLAG_INLINE:
        raise NotGoBinary("it was built with Go older than 1.18, whose build information "
                          "is reached through pointers; this reader needs Go 1.18 or newer")
    version, pos = _inline_string(data, at + HEADER_SIZE)
    modinfo, _ = _inline_string(data, pos)
    go_version = version.decode("utf-8", "replace")
    if not go_version.startswith("go"):
        raise NotGoBinary(f"the recorded Go version {go_version[:40]!r} is not one")
    # framed: <16-byte sentinel> text ending in a newline <16-byte sentinel>
    if len(modinfo) < 2 * SENTINEL_SIZE + 1 or modinfo[-SENTINEL_SIZE - 1] != ord("\n"):
        raise NotGoBinary("it holds no module information (built outside module mode)")
    text = modinfo[SENTINEL_SIZE:-SENTINEL_SIZE].decode("utf-8", "replace")
    return parse_build_info(text, go_version=go_version)


def decode_build_info(data: bytes) -> BuildInfo:
    """Return the build information in a Go binary's bytes; raise NotGoBinary if none."""
    at = data.find(MAGIC)
    problems: list[str] = []
    while at >= 0:
        # the header is 16-byte aligned; the same bytes elsewhere (a Go program that reads
        # build information holds them as a string) fail to decode and are skipped
        if at % ALIGN == 0:
            try:
                return _decode_at(data, at)
            except NotGoBinary as exc:
                problems.append(str(exc))
        at = data.find(MAGIC, at + 1)
    # the first header is the linker's; say what is wrong with it
    raise NotGoBinary(problems[0] if problems else
                      "no Go build information header (\\xff Go buildinf:) in it")


def read_build_info(path: Path) -> BuildInfo:
    """Read a Go binary's build information; raise NotGoBinary (or OSError) if it cannot."""
    try:
        return decode_build_info(Path(path).read_bytes())
    except NotGoBinary as exc:
        raise NotGoBinary(f"{path} is not a Go binary Kiln can read: {exc}") from None


def init_packages(data: bytes) -> set[str]:
    """Return the import paths of the packages in a Go binary that have a ``func init``.

    Function names stay in a binary's function table even when it is stripped
    (``-ldflags -s -w``); a package's first ``func init`` is named ``<path>.init.0``.
    Caddy plugins register their modules from ``init``, so these are the packages a
    rebuild must import to keep them.
    """
    found: set[str] = set()
    at = data.find(INIT_SUFFIX)
    while at >= 0:
        start = at
        while start > 0 and data[start - 1] in _PATH_BYTES:
            start -= 1
        if start > 0 and data[start - 1] == 0 and start < at:
            name = data[start:at].decode("ascii")
            # the last element of the path has its dots escaped as %2e in symbol names
            head, slash, last = name.rpartition("/")
            found.add(head + slash + last.replace("%2e", "."))
        at = data.find(INIT_SUFFIX, at + 1)
    return found
