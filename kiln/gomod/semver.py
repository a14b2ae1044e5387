"""Semantic versions as Go reads them (golang.org/x/mod/semver), and pseudo-versions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


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
