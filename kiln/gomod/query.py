"""Version queries as the go command takes them: latest, vX.Y.Z, prefixes, commits, branches."""

from __future__ import annotations

import re
from typing import Literal

from kiln.errors import SpecError, _show
from kiln.gomod.module import _char_problem
from kiln.gomod.semver import _parse_semver, is_semver

MAX_QUERY_LENGTH = 128
MAX_BRANCH_LENGTH = 100
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
