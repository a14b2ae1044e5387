"""Validation tables, semver semantics and build-key stability for kiln.request.spec."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from kiln.errors import SpecError
from kiln.gomod.module import (
    check_import_path,
    check_module_path,
    check_path_major,
    module_prefixes,
    split_path_version,
)
from kiln.gomod.query import check_version_query, query_kind
from kiln.gomod.semver import (
    canonical,
    canonical_version,
    is_prerelease,
    is_pseudo_version,
    is_semver,
    semver_compare,
    semver_major,
    semver_sort,
)
from kiln.request.platforms import PLATFORMS, check_platform
from kiln.request.spec import (
    CADDY_MODULE,
    DEFAULT_TAGS,
    BuildRequest,
    BuildSpec,
    PluginRequest,
    Replacement,
    ResolvedPlugin,
    parse_plugin,
    parse_replacement,
)

# ---------------------------------------------------------------------------
# Module and import paths: golang.org/x/mod/module's checkPathTests
# (path, module path ok, import path ok)
# ---------------------------------------------------------------------------

CHECK_PATH_TESTS = [
    ("x.y/z", True, True),
    ("x.y", True, True),
    ("", False, False),
    ("x.y/\udcffz", False, False),  # invalid UTF-8 as Python sees it
    ("/x.y/z", False, False),
    ("x./z", False, False),
    (".x/z", False, True),
    ("-x/z", False, False),
    ("x.y/z/../../w", False, False),
    ("x.y//z", False, False),
    ("x.y/z//w", False, False),
    ("x.y/z/", False, False),
    ("x.y/z/v0", False, True),
    ("x.y/z/v1", False, True),
    ("x.y/z/v2", True, True),
    ("x.y/z/v2.0", False, True),
    ("X.y/z", False, True),
    ("!x.y/z", False, False),
    ("_x.y/z", False, True),
    ("x.y!/z", False, False),
    ('x.y"/z', False, False),
    ("x.y#/z", False, False),
    ("x.y$/z", False, False),
    ("x.y%/z", False, False),
    ("x.y&/z", False, False),
    ("x.y'/z", False, False),
    ("x.y(/z", False, False),
    ("x.y)/z", False, False),
    ("x.y*/z", False, False),
    ("x.y+/z", False, True),
    ("x.y,/z", False, False),
    ("x.y-/z", True, True),
    ("x.y./zt", False, False),
    ("x.y:/z", False, False),
    ("x.y;/z", False, False),
    ("x.y</z", False, False),
    ("x.y=/z", False, False),
    ("x.y>/z", False, False),
    ("x.y?/z", False, False),
    ("x.y@/z", False, False),
    ("x.y[/z", False, False),
    ("x.y\\/z", False, False),
    ("x.y]/z", False, False),
    ("x.y^/z", False, False),
    ("x.y_/z", False, True),
    ("x.y`/z", False, False),
    ("x.y{/z", False, False),
    ("x.y}/z", False, False),
    ("x.y~/z", False, True),
    ("x.y/z!", False, False),
    ('x.y/z"', False, False),
    ("x.y/z#", False, False),
    ("x.y/z$", False, False),
    ("x.y/z%", False, False),
    ("x.y/z&", False, False),
    ("x.y/z'", False, False),
    ("x.y/z(", False, False),
    ("x.y/z)", False, False),
    ("x.y/z*", False, False),
    ("x.y/z++", False, True),
    ("x.y/z,", False, False),
    ("x.y/z-", True, True),
    ("x.y/z.t", True, True),
    ("x.y/z/t", True, True),
    ("x.y/z:", False, False),
    ("x.y/z;", False, False),
    ("x.y/z<", False, False),
    ("x.y/z=", False, False),
    ("x.y/z>", False, False),
    ("x.y/z?", False, False),
    ("x.y/z@", False, False),
    ("x.y/z[", False, False),
    ("x.y/z\\", False, False),
    ("x.y/z]", False, False),
    ("x.y/z^", False, False),
    ("x.y/z_", True, True),
    ("x.y/z`", False, False),
    ("x.y/z{", False, False),
    ("x.y/z}", False, False),
    ("x.y/z~", True, True),
    ("x.y/x.foo", True, True),
    ("x.y/aux.foo", False, False),
    ("x.y/prn", False, False),
    ("x.y/prn2", True, True),
    ("x.y/com", True, True),
    ("x.y/com1", False, False),
    ("x.y/com1.txt", False, False),
    ("x.y/calm1", True, True),
    ("x.y/z~0", False, False),
    ("x.y/z~09", False, False),
    ("x.y/z09", True, True),
    ("x.y/z09~", True, True),
    ("x.y/z09~09z", True, True),
    ("x.y/z09~09z~09", False, False),
    ("github.com/!123/logrus", False, False),
    ("github.com/user/unicode/испытание", False, False),
    ("../x", False, False),
    ("./y", False, False),
    ("x:y", False, False),
    ("\\temp\\foo", False, False),
    (".gitignore", False, True),
    (".github/ISSUE_TEMPLATE", False, True),
    ("x☺y", False, False),
    # Kiln is stricter than Go here: no ".." anywhere, even inside an element.
    ("x..y/z", False, False),
    # Kiln's own additions.
    ("gopkg.in/yaml.v3", True, True),
    ("gopkg.in/yaml", False, True),
    ("gopkg.in/yaml.v03", False, True),
    ("github.com/x/y/v02", False, True),
    ("github.com/x/y/v10", True, True),
    ("github.com/caddyserver/caddy/v2", True, True),
    ("github.com/x/y\x00", False, False),
    ("github.com/x/y z", False, False),
    ("github.com/x/y\tz", False, False),
    ("github.com/x/y\nz", False, False),
    ("a.b/" + "x" * 496, True, True),
    ("a.b/" + "x" * 497, False, False),
]


@pytest.mark.parametrize(("path", "module_ok", "import_ok"), CHECK_PATH_TESTS)
def test_check_paths_follow_go(path: str, module_ok: bool, import_ok: bool) -> None:
    if module_ok:
        assert check_module_path(path) == path
    else:
        with pytest.raises(SpecError):
            check_module_path(path)
    if import_ok:
        assert check_import_path(path) == path
    else:
        with pytest.raises(SpecError):
            check_import_path(path)


@pytest.mark.parametrize(
    ("path", "prefix", "major"),
    [
        ("x.y/z", "x.y/z", ""),
        ("x.y/z/v2", "x.y/z", "/v2"),
        ("x.y/z/v3", "x.y/z", "/v3"),
        ("x.y/v", "x.y/v", ""),
        ("gopkg.in/yaml.v0", "gopkg.in/yaml", ".v0"),
        ("gopkg.in/yaml.v1", "gopkg.in/yaml", ".v1"),
        ("gopkg.in/yaml.v2", "gopkg.in/yaml", ".v2"),
        ("gopkg.in/yaml.v3-unstable", "gopkg.in/yaml", ".v3-unstable"),
    ],
)
def test_split_path_version(path: str, prefix: str, major: str) -> None:
    assert split_path_version(path) == (prefix, major, True)


@pytest.mark.parametrize("path", [p for p, _, _ in CHECK_PATH_TESTS])
def test_split_path_version_adds_up(path: str) -> None:
    prefix, major, _ = split_path_version(path)
    assert prefix + major == path


@pytest.mark.parametrize(
    ("version", "path_major", "ok"),
    [
        ("v0.0.0", "", True),
        ("v0.0.0", "/v2", False),
        ("v0.0.0", ".v0", True),
        ("v0.0.0-20190510104115-cbcb75029529", ".v1", True),
        ("v1.0.0", "/v2", False),
        ("v1.0.0", ".v1", True),
        ("v1.0.0", ".v1-unstable", True),
        ("v2.0.0+incompatible", "", True),
        ("v2.0.0", "", False),
        ("v2.0.0", "/v2", True),
        ("v2.0.0", ".v2", True),
    ],
)
def test_check_path_major(version: str, path_major: str, ok: bool) -> None:
    assert (check_path_major(version, path_major) is None) is ok


def test_error_messages_say_what_and_how() -> None:
    with pytest.raises(SpecError) as exc:
        check_module_path("Github.com/x/y")
    assert (
        str(exc.value)
        == 'module path "Github.com/x/y": the host must be lowercase: write github.com'
    )
    with pytest.raises(SpecError) as exc:
        check_module_path("github.com/x/y/v1")
    assert "drop /v1" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        check_module_path("example/y")
    assert "host name containing a dot" in str(exc.value)


def test_module_prefixes_longest_first_and_only_valid() -> None:
    assert module_prefixes("github.com/x/y/caddy/sub") == [
        "github.com/x/y/caddy/sub",
        "github.com/x/y/caddy",
        "github.com/x/y",
    ]
    assert module_prefixes("example.com/a/v1/b") == [
        "example.com/a/v1/b",
        "example.com/a",
        "example.com",
    ]
    assert module_prefixes("gioui.org/x") == ["gioui.org/x", "gioui.org"]


# ---------------------------------------------------------------------------
# Semantic versions: golang.org/x/mod/semver's table, in ascending order
# ---------------------------------------------------------------------------

SEMVER_TESTS = [
    ("bad", ""),
    ("v1-alpha.beta.gamma", ""),
    ("v1-pre", ""),
    ("v1+meta", ""),
    ("v1-pre+meta", ""),
    ("v1.2-pre", ""),
    ("v1.2+meta", ""),
    ("v1.2-pre+meta", ""),
    ("v1.0.0-alpha", "v1.0.0-alpha"),
    ("v1.0.0-alpha.1", "v1.0.0-alpha.1"),
    ("v1.0.0-alpha.beta", "v1.0.0-alpha.beta"),
    ("v1.0.0-beta", "v1.0.0-beta"),
    ("v1.0.0-beta.2", "v1.0.0-beta.2"),
    ("v1.0.0-beta.11", "v1.0.0-beta.11"),
    ("v1.0.0-rc.1", "v1.0.0-rc.1"),
    ("v1", "v1.0.0"),
    ("v1.0", "v1.0.0"),
    ("v1.0.0", "v1.0.0"),
    ("v1.2", "v1.2.0"),
    ("v1.2.0", "v1.2.0"),
    ("v1.2.3-456", "v1.2.3-456"),
    ("v1.2.3-456.789", "v1.2.3-456.789"),
    ("v1.2.3-456-789", "v1.2.3-456-789"),
    ("v1.2.3-456a", "v1.2.3-456a"),
    ("v1.2.3-pre", "v1.2.3-pre"),
    ("v1.2.3-pre+meta", "v1.2.3-pre"),
    ("v1.2.3-pre.1", "v1.2.3-pre.1"),
    ("v1.2.3-zzz", "v1.2.3-zzz"),
    ("v1.2.3", "v1.2.3"),
    ("v1.2.3+meta", "v1.2.3"),
    ("v1.2.3+meta-pre", "v1.2.3"),
    ("v1.2.3+meta-pre.sha.256a", "v1.2.3"),
]


@pytest.mark.parametrize(("version", "want"), SEMVER_TESTS)
def test_semver_valid_and_canonical(version: str, want: str) -> None:
    assert is_semver(version) is (want != "")
    assert canonical(version) == want
    assert semver_major(version) == (want.split(".")[0] if want else "")


def test_semver_compare_matches_table_order() -> None:
    for i, (vi, ci) in enumerate(SEMVER_TESTS):
        for j, (vj, cj) in enumerate(SEMVER_TESTS):
            want = 0 if ci == cj else (-1 if i < j else 1)
            assert semver_compare(vi, vj) == want, (vi, vj)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("v1.9.0", "v1.10.0"),
        ("v1.0.0-rc.9", "v1.0.0-rc.10"),
        ("v1.0.0-2", "v1.0.0-10"),
        ("v1.0.0-10", "v1.0.0-a"),
        ("v1.0.0-a", "v1.0.0-a.1"),
        ("v2.0.0+incompatible", "v2.0.1"),
        ("v0.0.0-20240101000000-abcdefabcdef", "v0.0.1"),
        ("v2.8.4", "v2.9.0-beta.1"),
    ],
)
def test_semver_ordering(low: str, high: str) -> None:
    assert semver_compare(low, high) == -1
    assert semver_compare(high, low) == 1


def test_semver_sort_and_prerelease() -> None:
    versions = ["v1.10.0", "v1.2.0", "v1.2.0-rc.1", "v0.9.9", "v1.2.0+meta"]
    assert semver_sort(versions) == ["v0.9.9", "v1.2.0-rc.1", "v1.2.0", "v1.2.0+meta", "v1.10.0"]
    assert semver_sort(versions, reverse=True)[0] == "v1.10.0"
    assert is_prerelease("v1.2.0-rc.1")
    assert not is_prerelease("v1.2.0")
    assert not is_prerelease("bad-version")
    assert canonical_version("v2.0.0+incompatible") == "v2.0.0+incompatible"
    assert canonical_version("v2.0.0+meta") == "v2.0.0"


@pytest.mark.parametrize(
    ("version", "pseudo"),
    [
        ("v0.0.0-20060102150405-abcdefabcdef", True),
        ("v1.0.0-20060102150405-abcdefabcdef", True),
        ("v1.2.4-0.20060102150405-abcdefabcdef", True),
        ("v1.2.3-pre.0.20060102150405-abcdefabcdef", True),
        ("v2.0.1-0.20060102150405-abcdefabcdef+incompatible", True),
        ("v0.0.0-20240703190432-89f16b99c18e", True),
        ("v1.2.3", False),
        ("v1.2.3-pre", False),
        ("v1.2.3-0.2006010215040-abc", False),  # 13-digit timestamp
        ("v1.2.3-20060102150405-abc", False),  # base without -0.
        ("20060102150405-abcdefabcdef", False),
    ],
)
def test_is_pseudo_version(version: str, pseudo: bool) -> None:
    assert is_pseudo_version(version) is pseudo


# ---------------------------------------------------------------------------
# Version queries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "normalized", "kind"),
    [
        (None, "latest", "latest"),
        ("", "latest", "latest"),
        ("latest", "latest", "latest"),
        ("v2.8.4", "v2.8.4", "semver"),
        ("v2.9.0-beta.1", "v2.9.0-beta.1", "semver"),
        ("v2.0.0+incompatible", "v2.0.0+incompatible", "semver"),
        ("v1.2.3+meta", "v1.2.3+meta", "semver"),
        ("v0.0.0-20240703190432-89f16b99c18e", "v0.0.0-20240703190432-89f16b99c18e", "semver"),
        ("v1.2.4-0.20060102150405-abcdefabcdef", "v1.2.4-0.20060102150405-abcdefabcdef", "semver"),
        (
            "v1.2.3-pre.0.20060102150405-abcdefabcdef",
            "v1.2.3-pre.0.20060102150405-abcdefabcdef",
            "semver",
        ),
        ("v2", "v2", "prefix"),
        ("v2.8", "v2.8", "prefix"),
        ("89f16b9", "89f16b9", "commit"),
        (
            "89f16b99c18e89f16b99c18e89f16b99c18e89f1",
            "89f16b99c18e89f16b99c18e89f16b99c18e89f1",
            "commit",
        ),
        ("master", "master", "branch"),
        ("feature/new-thing", "feature/new-thing", "branch"),
        ("release-2.x_final", "release-2.x_final", "branch"),
        ("LATEST", "LATEST", "branch"),
        ("b" * 100, "b" * 100, "branch"),
    ],
)
def test_version_queries_accepted(query: str | None, normalized: str, kind: str) -> None:
    assert check_version_query(query) == normalized
    assert query_kind(normalized) == kind


@pytest.mark.parametrize(
    "query",
    [
        "; rm -rf /",
        "$(id)",
        "`id`",
        "v1.0.0;id",
        "main branch",
        "'main'",
        '"main"',
        "-rf",
        "/etc/passwd",
        "../../etc",
        "a..b",
        "v1.2.3+",
        "v1.2.3-",
        "v1.2.3-01",
        "main\x00",
        "mäin",
        "main\n",
        ">v1.0.0",
        "<=v1.0.0",
        "none",
        "upgrade",
        "patch",
        "b" * 101,
        "v1.0.0-" + "a" * 130,
        "@v1",
        "v1.0.0@v2",
    ],
)
def test_version_queries_refused(query: str) -> None:
    with pytest.raises(SpecError) as exc:
        check_version_query(query, field="caddy_version")
    assert exc.value.field == "caddy_version"


# ---------------------------------------------------------------------------
# Plugins and replacements
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "query"),
    [
        ("github.com/caddy-dns/cloudflare", "github.com/caddy-dns/cloudflare", "latest"),
        ("github.com/caddy-dns/cloudflare@v0.2.1", "github.com/caddy-dns/cloudflare", "v0.2.1"),
        (
            "github.com/caddy-dns/cloudflare@v0.0.0-20240703190432-89f16b99c18e",
            "github.com/caddy-dns/cloudflare",
            "v0.0.0-20240703190432-89f16b99c18e",
        ),
        ("https://github.com/mholt/caddy-l4", "github.com/mholt/caddy-l4", "latest"),
        ("http://github.com/mholt/caddy-l4/", "github.com/mholt/caddy-l4", "latest"),
        ("HTTPS://github.com/mholt/caddy-l4/@master", "github.com/mholt/caddy-l4", "master"),
        ("  github.com/x/y@v1  ", "github.com/x/y", "v1"),
        ("github.com/x/y/v2@v2.1.0", "github.com/x/y/v2", "v2.1.0"),
        ("github.com/x/y/caddy/sub", "github.com/x/y/caddy/sub", "latest"),
        ("github.com/Azure/azure-sdk-for-go", "github.com/Azure/azure-sdk-for-go", "latest"),
        ("gopkg.in/yaml.v3", "gopkg.in/yaml.v3", "latest"),
        ("github.com/x/y@latest", "github.com/x/y", "latest"),
    ],
)
def test_parse_plugin(text: str, path: str, query: str) -> None:
    assert parse_plugin(text) == PluginRequest(path, query)


@pytest.mark.parametrize(
    "text",
    [
        "; rm -rf /",
        "$(id)",
        "github.com/x/y;id",
        "github.com/x/y && id",
        "github.com/x/`id`",
        "github.com/x/'y'",
        'github.com/x/"y"',
        "github.com/x/y|id",
        "github.com/x/y>out",
        "../x",
        "./x",
        "/etc/passwd",
        "github.com/x/../y",
        "github.com/x/./y",
        "x..y/z",
        "Github.com/x/y",
        "-leading.com/x",
        "github.com/x/y/v1",
        "github.com/x/y/v0",
        "github.com/x/y/v02",
        "github.com/x/y/v2.0",
        "github.com",
        "github.com/x",
        "localhost/x",
        "a.b/" + "x" * 600,
        "github.com/x/y\x00",
        "github.com/x/\x00y",
        "github.com/ünïcode/y",
        "github.com/x/y\u200b",
        "github.com/x/y\u202e",
        "github.com/x/y@",
        "github.com/x/y@v1@v2",
        "github.com/x/y=github.com/z/y@v1.0.0",
        "github.com/x/y@$(id)",
        "github.com/x/y@v1.0.0;id",
        "",
        "   ",
        "file:///etc/passwd",
        "git@github.com:x/y.git",
        "github.com/x/con",
        "github.com/x/y~1",
    ],
)
def test_parse_plugin_refuses(text: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_plugin(text, field="plugins[2]")
    assert exc.value.field == "plugins[2]"
    assert isinstance(exc.value, ValueError)


def test_parse_plugin_messages() -> None:
    with pytest.raises(SpecError) as exc:
        parse_plugin("Github.com/x/y")
    assert (
        str(exc.value)
        == 'module path "Github.com/x/y": the host must be lowercase: write github.com'
    )
    with pytest.raises(SpecError) as exc:
        parse_plugin("github.com/x/y=github.com/z/y@v1.0.0")
    assert "replacements separately" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        parse_plugin("github.com/x/y\x00")
    assert "NUL" in str(exc.value)
    assert "\x00" not in str(exc.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "github.com/x/y=github.com/me/y@v1.2.3",
            Replacement("github.com/x/y", "github.com/me/y", "v1.2.3"),
        ),
        (
            "github.com/x/y=github.com/me/y",
            Replacement("github.com/x/y", "github.com/me/y", "latest"),
        ),
        (
            "github.com/x/y@v1.0.0=github.com/me/y@v1.0.1",
            Replacement("github.com/x/y", "github.com/me/y", "v1.0.1", old_version="v1.0.0"),
        ),
        (
            "github.com/x/y=github.com/me/y@fix-branch",
            Replacement("github.com/x/y", "github.com/me/y", "fix-branch"),
        ),
        (
            " https://github.com/x/y = https://github.com/me/y@v1.2.3 ",
            Replacement("github.com/x/y", "github.com/me/y", "v1.2.3"),
        ),
        (
            "github.com/x/y@v1.0.0=github.com/x/y@v1.0.1",
            Replacement("github.com/x/y", "github.com/x/y", "v1.0.1", old_version="v1.0.0"),
        ),
    ],
)
def test_parse_replacement(text: str, want: Replacement) -> None:
    assert parse_replacement(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "github.com/x/y=../y",
        "github.com/x/y=./y",
        "github.com/x/y=/home/me/y",
        "github.com/x/y=~/y",
        "github.com/x/y=C:\\src\\y",
        "github.com/x/y=..\\y",
        "../y=github.com/me/y@v1.0.0",
        "github.com/x/y",
        "github.com/x/y=",
        "=github.com/me/y@v1.0.0",
        "a.b/c=d.e/f=g.h/i",
        "github.com/x/y=github.com/x/y",
        "github.com/x/y@latest=github.com/me/y@v1.0.0",
        "github.com/x/y@v1.2=github.com/me/y@v1.0.0",
        "github.com/x/y@v2.0.0=github.com/me/y@v1.0.0",
        "github.com/x/y=github.com/me/y@$(id)",
        "github.com/x/y=github.com/me/y;id",
        "github.com/x/y=Github.com/me/y@v1.0.0",
        "github.com/x/y=github.com/me/y/v1@v1.0.0",
    ],
)
def test_parse_replacement_refuses(text: str) -> None:
    with pytest.raises(SpecError):
        parse_replacement(text)


def test_local_replacement_message_explains_sandbox() -> None:
    with pytest.raises(SpecError) as exc:
        parse_replacement("github.com/x/y=../fork", field="replacements[0]")
    assert exc.value.field == "replacements[0]"
    assert "local path" in str(exc.value)


# ---------------------------------------------------------------------------
# Platforms and build requests
# ---------------------------------------------------------------------------


def test_platform_table() -> None:
    offered = {f"{o}/{a}" for o, a in PLATFORMS}
    for platform in [
        "linux/amd64", "linux/arm64", "linux/arm", "linux/mips", "linux/mipsle", "linux/mips64",
        "linux/mips64le", "linux/ppc64", "linux/ppc64le", "linux/s390x", "linux/loong64",
        "linux/386", "linux/riscv64", "darwin/amd64", "darwin/arm64", "windows/amd64",
        "windows/arm64", "freebsd/amd64", "freebsd/arm", "freebsd/arm64", "openbsd/amd64",
        "openbsd/arm", "openbsd/arm64", "dragonfly/amd64",
    ]:  # fmt: skip
        assert platform in offered
    assert len(offered) == 24
    assert PLATFORMS["linux", "arm"] == ("5", "6", "7")
    assert PLATFORMS["freebsd", "arm"] == ("6", "7")
    assert PLATFORMS["openbsd", "arm"] == ("6", "7")
    assert PLATFORMS["linux", "amd64"] == ()


@pytest.mark.parametrize(
    ("os", "arch", "arm", "want"),
    [
        ("linux", "amd64", None, ("linux", "amd64", "")),
        ("linux", "amd64", "", ("linux", "amd64", "")),
        ("Linux", " AMD64 ", None, ("linux", "amd64", "")),
        ("linux", "arm", None, ("linux", "arm", "7")),
        ("linux", "arm", "5", ("linux", "arm", "5")),
        ("linux", "arm", 6, ("linux", "arm", "6")),
        ("freebsd", "arm", "6", ("freebsd", "arm", "6")),
        ("windows", "arm64", None, ("windows", "arm64", "")),
    ],
)
def test_check_platform_accepts(
    os: str, arch: str, arm: object, want: tuple[str, str, str]
) -> None:
    assert check_platform(os, arch, arm) == want


@pytest.mark.parametrize(
    ("os", "arch", "arm", "field", "message"),
    [
        (
            "linux",
            "sparc",
            None,
            "arch",
            "unsupported platform linux/sparc: choose one of linux/386, linux/amd64",
        ),
        (
            "plan9",
            "amd64",
            None,
            "os",
            "unsupported platform plan9/amd64: choose one of darwin/amd64",
        ),
        ("windows", "arm", None, "arch", "Go no longer builds windows/arm"),
        ("linux", "arm", "9", "arm", "arm=9 is not valid for linux/arm: use 5, 6 or 7"),
        ("freebsd", "arm", "5", "arm", "arm=5 is not valid for freebsd/arm: use 6 or 7"),
        ("linux", "amd64", "7", "arm", "arm=7 is only for arm builds"),
        ("linux", "arm", "7; id", "arm", "is not valid for linux/arm"),
        ("", "amd64", None, "os", "os is required"),
        ("linux", "", None, "arch", "arch is required"),
        ("linux;id", "amd64", None, "os", "unsupported platform"),
        ("linux", "amd64\x00", None, "arch", "unsupported platform"),
        ("darwin", "arm", None, "arch", "choose one of darwin/amd64, darwin/arm64"),
    ],
)
def test_check_platform_refuses(os: str, arch: str, arm: object, field: str, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        check_platform(os, arch, arm)
    assert exc.value.field == field
    assert message in str(exc.value)


def test_build_request_create() -> None:
    request = BuildRequest.create(
        os="linux",
        arch="arm",
        caddy_version="v2.8.4",
        plugins=[
            "github.com/z/last@v1.0.0",
            "https://github.com/a/first",
            PluginRequest("github.com/m/mid", "v2"),
        ],
        replacements=["github.com/q/r=github.com/me/r@v1.0.0"],
    )
    assert request.arm == "7"
    assert request.caddy_query == "v2.8.4"
    assert [p.path for p in request.plugins] == [
        "github.com/a/first",
        "github.com/m/mid",
        "github.com/z/last",
    ]
    assert request.replacements == (Replacement("github.com/q/r", "github.com/me/r", "v1.0.0"),)
    assert BuildRequest.create(os="linux", arch="amd64").caddy_query == "latest"


def test_build_request_plugin_order_does_not_matter() -> None:
    plugins = [f"github.com/p/plugin{i}@v1.{i}.0" for i in range(10)]
    shuffled = plugins[:]
    random.Random(7).shuffle(shuffled)
    assert BuildRequest.create(os="linux", arch="amd64", plugins=plugins) == BuildRequest.create(
        os="linux", arch="amd64", plugins=shuffled
    )


def test_build_request_field_errors() -> None:
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(
            os="linux", arch="amd64", plugins=["github.com/a/b", "github.com/c/d", "$(id)"]
        )
    assert exc.value.field == "plugins[2]"
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(os="linux", arch="amd64", caddy_version="; rm -rf /")
    assert exc.value.field == "caddy_version"
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(os="linux", arch="amd64", caddy_version="v1.0.4")
    assert exc.value.field == "caddy_version"
    assert "Caddy 2" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(os="linux", arch="amd64", replacements=["github.com/a/b=../b"])
    assert exc.value.field == "replacements[0]"


def test_build_request_refuses_duplicates() -> None:
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(
            os="linux",
            arch="amd64",
            plugins=["github.com/a/b@v1.0.0", "https://github.com/a/b@v1.1.0"],
        )
    assert exc.value.field == "plugins[1]"
    assert "listed twice" in str(exc.value)
    with pytest.raises(SpecError):
        BuildRequest.create(
            os="linux",
            arch="amd64",
            replacements=[
                "github.com/a/b=github.com/c/b@v1.0.0",
                "github.com/a/b=github.com/d/b@v1.0.0",
            ],
        )


def test_build_request_too_many_plugins() -> None:
    plugins = [f"github.com/p/plugin{i}" for i in range(200)]
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(os="linux", arch="amd64", plugins=plugins)
    assert exc.value.field == "plugins"
    assert "200" in str(exc.value) and "50" in str(exc.value)
    assert len(BuildRequest.create(os="linux", arch="amd64", plugins=plugins[:50]).plugins) == 50
    assert (
        len(BuildRequest.create(os="linux", arch="amd64", plugins=plugins, max_plugins=200).plugins)
        == 200
    )


def test_core_pin_through_plugins() -> None:
    request = BuildRequest.create(
        os="linux", arch="amd64", plugins=[f"{CADDY_MODULE}@v2.8.4", "github.com/a/b"]
    )
    assert request.caddy_query == "v2.8.4"
    assert [p.path for p in request.plugins] == ["github.com/a/b"]
    # The pre-modules path is the same module to a user.
    legacy = BuildRequest.create(
        os="linux", arch="amd64", plugins=["github.com/caddyserver/caddy@v2.7.6"]
    )
    assert legacy.caddy_query == "v2.7.6"
    # Agreeing pins are fine; a bare core path pins nothing.
    same = BuildRequest.create(
        os="linux", arch="amd64", caddy_version="v2.8.4", plugins=[f"{CADDY_MODULE}@v2.8.4"]
    )
    assert same.caddy_query == "v2.8.4"
    bare = BuildRequest.create(
        os="linux", arch="amd64", caddy_version="v2.8.4", plugins=[CADDY_MODULE]
    )
    assert bare.caddy_query == "v2.8.4"
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(
            os="linux",
            arch="amd64",
            caddy_version="v2.7.6",
            plugins=["github.com/a/b", f"{CADDY_MODULE}@v2.8.4"],
        )
    assert exc.value.field == "plugins[1]"
    assert "caddy_version" in str(exc.value)
    with pytest.raises(SpecError):
        BuildRequest.create(os="linux", arch="amd64", plugins=[f"{CADDY_MODULE}@v1.0.0"])
    with pytest.raises(SpecError):
        BuildRequest.create(
            os="linux",
            arch="amd64",
            plugins=[f"{CADDY_MODULE}@v2.8.4", "github.com/caddyserver/caddy@v2.8.4"],
        )


def test_core_subpackages_follow_caddy_version() -> None:
    sub = f"{CADDY_MODULE}/modules/caddyhttp/proxyprotocol"
    request = BuildRequest.create(os="linux", arch="amd64", plugins=[sub])
    assert request.plugins == (PluginRequest(sub, "latest"),)
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(
            os="linux", arch="amd64", caddy_version="v2.8.4", plugins=[f"{sub}@v2.7.0"]
        )
    assert "part of Caddy itself" in str(exc.value)


def test_arm_only_for_arm() -> None:
    with pytest.raises(SpecError) as exc:
        BuildRequest.create(os="linux", arch="amd64", arm="7")
    assert exc.value.field == "arm"


# ---------------------------------------------------------------------------
# Build spec and key
# ---------------------------------------------------------------------------


def make_spec(**changes: object) -> BuildSpec:
    fields: dict[str, object] = {
        "os": "linux",
        "arch": "amd64",
        "arm": "",
        "caddy_version": "v2.8.4",
        "plugins": (
            ResolvedPlugin(
                "github.com/caddy-dns/cloudflare", "github.com/caddy-dns/cloudflare", "v0.2.1"
            ),
            ResolvedPlugin(
                "github.com/mholt/caddy-l4/layer4",
                "github.com/mholt/caddy-l4",
                "v0.0.0-20240703190432-89f16b99c18e",
            ),
            ResolvedPlugin("github.com/a/plugin/v2", "github.com/a/plugin/v2", "v2.1.0"),
        ),
        "replacements": (Replacement("github.com/x/y", "github.com/me/y", "v1.2.3"),),
        "go_version": "go1.25.3",
        "sandbox": "kiln-go-sandbox@sha256:0123abcd",
    }
    fields.update(changes)
    return BuildSpec(**fields)  # type: ignore[arg-type]


def test_key_is_sha256_of_canonical_json() -> None:
    import hashlib

    spec = make_spec()
    text = spec.canonical_json()
    assert " " not in text.replace("-w -s", "")
    assert json.loads(text)["v"] == 1
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert spec.key() == hashlib.sha256(text.encode()).hexdigest()
    assert len(spec.key()) == 64


def test_key_is_stable_across_plugin_order() -> None:
    spec = make_spec()
    for seed in range(5):
        plugins = list(spec.plugins)
        random.Random(seed).shuffle(plugins)
        reordered = make_spec(plugins=tuple(plugins))
        assert reordered.key() == spec.key()
        assert reordered == spec
    assert [p.package for p in spec.plugins] == sorted(p.package for p in spec.plugins)


@pytest.mark.parametrize(
    "change",
    [
        {"os": "darwin"},
        {"arch": "arm64"},
        {"arch": "arm", "arm": "7"},
        {"caddy_version": "v2.8.3"},
        {"plugins": ()},
        {"replacements": ()},
        {"replacements": (Replacement("github.com/x/y", "github.com/me/y", "v1.2.4"),)},
        {
            "replacements": (
                Replacement("github.com/x/y", "github.com/me/y", "v1.2.3", old_version="v1.0.0"),
            )
        },
        {"go_version": "go1.25.4"},
        {"sandbox": "kiln-go-sandbox@sha256:4567ef"},
        {"tags": ("nobadger",)},
        {"ldflags": "-s"},
        {"trimpath": False},
    ],
)
def test_any_change_changes_the_key(change: dict[str, object]) -> None:
    assert make_spec(**change).key() != make_spec().key()


def test_plugin_changes_change_the_key() -> None:
    spec = make_spec()
    first, *rest = spec.plugins
    variants = [
        dataclasses.replace(first, version="v0.2.2"),
        dataclasses.replace(first, package=first.package + "/sub"),
        ResolvedPlugin(
            "github.com/caddy-dns/cloudflare/x", "github.com/caddy-dns/cloudflare/x", "v0.2.1"
        ),
    ]
    keys = {spec.key()}
    for variant in variants:
        keys.add(make_spec(plugins=(variant, *rest)).key())
    keys.add(
        make_spec(
            plugins=(
                *spec.plugins,
                ResolvedPlugin("github.com/n/new", "github.com/n/new", "v1.0.0"),
            )
        ).key()
    )
    assert len(keys) == len(variants) + 2


def test_round_trip_and_helpers() -> None:
    spec = make_spec(arch="arm", arm="6")
    data = json.loads(json.dumps(spec.to_dict()))
    again = BuildSpec.from_dict(data)
    assert again == spec and again.key() == spec.key()
    assert spec.tags == DEFAULT_TAGS and spec.ldflags == "-w -s" and spec.trimpath is True
    assert spec.filename == "caddy_linux_arm_custom"
    assert spec.goenv() == {"GOOS": "linux", "GOARCH": "arm", "GOARM": "6"}
    win = make_spec(os="windows", arch="amd64")
    assert win.filename == "caddy_windows_amd64_custom.exe"
    assert win.goenv() == {"GOOS": "windows", "GOARCH": "amd64"}


@pytest.mark.parametrize(
    "change",
    [
        {"caddy_version": "latest"},
        {"caddy_version": "v2.8"},
        {"caddy_version": "v1.0.4"},
        {"arch": "arm"},  # arm must be explicit in a resolved spec
        {"arch": "amd64", "arm": "7"},
        {"go_version": "1.25"},
        {"go_version": "go1.25; id"},
        {"sandbox": ""},
        {"tags": ("nobadger,evil",)},
        {"ldflags": "-X 'a=$(id)'"},
        {"plugins": (ResolvedPlugin("github.com/a/b/c", "github.com/x/y", "v1.0.0"),)},
        {"plugins": (ResolvedPlugin("github.com/a/b", "github.com/a/b", "master"),)},
        {"replacements": (Replacement("github.com/x/y", "github.com/me/y", "latest"),)},
    ],
)
def test_spec_refuses_unresolved_or_unsafe_values(change: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        make_spec(**change)


def test_from_dict_checks_schema() -> None:
    data = make_spec().to_dict()
    with pytest.raises(SpecError):
        BuildSpec.from_dict({**data, "v": 2})
    broken = dict(data)
    del broken["sandbox"]
    with pytest.raises(SpecError):
        BuildSpec.from_dict(broken)
