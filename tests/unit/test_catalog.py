"""The plugin catalog: reading /api/packages documents, mapping requests, the allow policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.errors import SpecError
from kiln.request.catalog import (
    Catalog,
    CatalogError,
    CatalogIndex,
    CatalogPolicy,
    CatalogUnavailable,
    PackageNotRegistered,
    parse_packages,
    read_catalog_file,
    spellings,
)
from kiln.request.spec import DEFAULT_MAX_PLUGINS, BuildRequest

DNS = "github.com/acme/dns/v2"
DNS_PROVIDER = f"{DNS}/providers/example"
L4 = "github.com/acme/l4"


def document() -> dict[str, object]:
    return {"status_code": 200, "result": [
        {"id": "1", "path": "github.com/acme/hello", "repo": "https://github.com/acme/hello",
         "downloads": 3, "listed": True, "available": True, "published": "2024-01-01",
         "updated": "2024-02-01",
         "modules": [{"name": "http.handlers.hello", "docs": "Greets.",
                      "package": "github.com/acme/hello", "repo": "https://github.com/acme/hello"}]},
        {"path": DNS_PROVIDER, "modules": [{"name": "dns.providers.example"}]},
        # one entry, modules in two subpackages of the module (like caddy-l4)
        {"path": f"{L4}/layer4", "modules": [
            {"name": "layer4", "package": f"{L4}/layer4"},
            {"name": "layer4.matchers.tls", "package": f"{L4}/modules/l4tls"}]},
        {"path": "github.com/acme/retired", "available": False},
        {"path": "github.com/acme/multi/providers/x"},
    ]}


def index() -> CatalogIndex:
    return CatalogIndex(parse_packages(document(), source="test", strict=True))


def request(*plugins: str, replacements: tuple[str, ...] = ()) -> BuildRequest:
    return BuildRequest.create(os="linux", arch="amd64", plugins=list(plugins),
                               replacements=list(replacements))


def test_entries_get_the_caddyserver_shape_with_defaults() -> None:
    packages = {p.path: p.to_dict() for p in parse_packages(document(), source="t", strict=True)}
    assert packages["github.com/acme/hello"]["downloads"] == 3
    provider = packages[DNS_PROVIDER]
    assert set(provider) == {"id", "path", "repo", "downloads", "listed", "available",
                             "published", "updated", "modules"}
    assert provider["repo"] == f"https://{DNS_PROVIDER}"
    assert provider["modules"] == [{"name": "dns.providers.example", "docs": "",
                                    "package": DNS_PROVIDER, "repo": f"https://{DNS_PROVIDER}"}]
    # a stable id when the source gives none
    again = parse_packages(document(), source="t", strict=True)
    assert {p.path: p.id for p in again}[DNS_PROVIDER] == provider["id"]
    # a bare list is accepted too, and https:// prefixes are stripped
    bare = parse_packages([{"path": "https://github.com/acme/x/"}], source="t", strict=True)
    assert [p.path for p in bare] == ["github.com/acme/x"]


@pytest.mark.parametrize("bad", [
    {"result": "nope"},
    [{"modules": []}],
    [{"path": "github.com/acme/x;rm -rf"}],
    [{"path": "github.com/acme/x@v1.0.0"}],
    [{"path": "github.com/acme/x", "downloads": -1}],
    [{"path": "github.com/acme/x", "modules": [{"docs": "no name"}]}],
    [{"path": "github.com/acme/x", "listed": "yes"}],
])
def test_a_bad_operator_file_is_refused_and_a_bad_mirror_entry_skipped(bad: object) -> None:
    with pytest.raises(CatalogError):
        parse_packages(bad, source="catalog.json", strict=True)
    if isinstance(bad, list):
        assert parse_packages([*bad, {"path": "github.com/acme/ok"}], source="upstream",
                              strict=False)[-1].path == "github.com/acme/ok"


def test_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "c.yml").write_text("result:\n  - path: github.com/acme/hello\n")
    assert [p.path for p in read_catalog_file(tmp_path / "c.yml")] == ["github.com/acme/hello"]
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CatalogError, match="c.json: not valid JSON"):
        read_catalog_file(tmp_path / "c.json")


def test_only_a_module_roots_trailing_major_version_is_compared_away() -> None:
    assert spellings("github.com/a/b/v2/sub") == ["github.com/a/b/v2/sub", "github.com/a/b/sub"]
    assert spellings("github.com/a/b") == ["github.com/a/b"]
    assert spellings("gopkg.in/yaml.v3") == ["gopkg.in/yaml.v3"]
    # a /vN that names an owner or a repository is part of who publishes the code
    assert spellings("github.com/v2/a/plug") == ["github.com/v2/a/plug"]
    assert spellings("github.com/a/v2/plug") == ["github.com/a/v2/plug"]
    assert spellings("codeberg.org/v2/a/plug") == ["codeberg.org/v2/a/plug"]
    assert spellings("example.com/team/v3/plug") == ["example.com/team/v3/plug",
                                                     "example.com/team/plug"]
    # a path of many /vN elements is matched as written, not tried at each of them
    many_majors = "github.com/a/b/" + "v2/" * 160 + "x"
    assert spellings(many_majors) == [many_majors]


def test_caddy_upgrade_module_paths_map_to_registered_packages() -> None:
    idx = index()
    # caddy upgrade names the module; the registered package is a subpackage of it
    mapped = idx.map_request(request(f"{DNS}@v2.1.0"))
    assert [str(p) for p in mapped.plugins] == [f"{DNS_PROVIDER}@v2.1.0"]
    # base@v2.x names the package registered under base/v2
    mapped = idx.map_request(request("github.com/acme/dns@v2.1.0"))
    assert [str(p) for p in mapped.plugins] == [f"{DNS_PROVIDER}@v2.1.0"]
    # base/v3 for a package registered without /vN keeps the major version asked for
    mapped = idx.map_request(request("github.com/acme/multi/v3"))
    assert [str(p) for p in mapped.plugins] == ["github.com/acme/multi/v3/providers/x"]
    # and the other way round, without spelling the major version twice
    mapped = idx.map_request(request("github.com/acme/dns/v3"))
    assert [str(p) for p in mapped.plugins] == ["github.com/acme/dns/v3/providers/example"]
    # a module whose modules live in two subpackages brings both
    mapped = idx.map_request(request(f"{L4}@v0.3.0"))
    assert [str(p) for p in mapped.plugins] == [f"{L4}/layer4@v0.3.0",
                                                f"{L4}/modules/l4tls@v0.3.0"]
    # a Caddy module ID becomes its package
    mapped = idx.map_request(request("dns.providers.example"))
    assert [p.path for p in mapped.plugins] == [DNS_PROVIDER]
    # registered and unknown paths stay as they are
    same = request("github.com/acme/hello@v1.0.0", "github.com/other/thing")
    assert idx.map_request(same) is same


def test_registered_policy_admits_catalog_packages_only() -> None:
    idx = index()
    idx.check(request("github.com/acme/hello", f"{DNS_PROVIDER}@v2.0.0",
                      "github.com/acme/hello/subpkg", "github.com/caddyserver/caddy/v2/modules/x"))
    with pytest.raises(PackageNotRegistered) as info:
        idx.check(request("github.com/other/thing"))
    assert str(info.value).startswith(
        "github.com/other/thing is not a registered Caddy module package path")
    assert info.value.field == "plugins[0]"
    with pytest.raises(PackageNotRegistered, match="not available"):
        idx.check(request("github.com/acme/retired"))
    # a replacement may not swap registered code for unregistered code
    with pytest.raises(PackageNotRegistered, match="github.com/evil/fork"):
        idx.check(request("github.com/acme/hello", replacements=(
            "github.com/acme/hello=github.com/evil/fork@v1.0.0",)))


def test_file_catalog_is_reread_when_it_changes_and_last_copy_survives_errors(
        tmp_path: Path) -> None:
    file = tmp_path / "catalog.json"
    file.write_text(json.dumps(document()))
    now = [0.0]
    catalog = Catalog(store=None, file=file, ttl=10, clock=lambda: now[0])
    assert len(catalog.packages()) == 5
    file.write_text(json.dumps({"result": [{"path": "github.com/acme/only"}]}))
    assert len(catalog.packages()) == 5  # within the ttl
    now[0] = 11
    assert [p.path for p in catalog.packages()] == ["github.com/acme/only"]
    file.write_text("{broken")
    now[0] = 30
    assert [p.path for p in catalog.packages()] == ["github.com/acme/only"]
    broken = Catalog(store=None, file=file)
    with pytest.raises(CatalogUnavailable, match="cannot be read"):
        broken.packages()


def registry(*paths: str) -> CatalogIndex:
    return CatalogIndex(parse_packages([{"path": p} for p in paths], source="t", strict=True))


def refused(idx: CatalogIndex, *plugins: str, replacements: tuple[str, ...] = ()) -> str:
    """Return the message the registered-only policy refuses a mapped request with."""
    with pytest.raises(PackageNotRegistered) as info:
        idx.check(idx.map_request(request(*plugins, replacements=replacements)))
    return str(info.value)


@pytest.mark.parametrize("path", [
    "github.com/v2/a/plug",         # GitHub user "v2", repository "a"
    "github.com/v10/a/plug/sub",
    "github.com/a/v2/plug",         # another repository of the owner, named "v2"
    "github.com/a/v2/plug/v3",
    "codeberg.org/v2/a/plug",       # a user "v2" on a forge Kiln knows nothing about
    "example.com/v2/team/plug",
])
def test_a_path_owned_elsewhere_is_not_a_registered_package(path: str) -> None:
    idx = registry("github.com/a/plug", "codeberg.org/a/plug", "example.com/team/plug")
    assert idx.find(path) is None
    assert refused(idx, path).startswith(
        f"{path} is not a registered Caddy module package path")


def test_other_majors_and_subpackages_of_a_registered_module_are_admitted() -> None:
    idx = registry("github.com/a/plug", "example.com/team/plug", DNS_PROVIDER)
    idx.check(request("github.com/a/plug/v3", "github.com/a/plug/v3/x", "github.com/a/plug/x",
                      "example.com/team/plug/v2", "github.com/acme/dns/providers/example",
                      "github.com/acme/dns/v3/providers/example"))


def test_a_module_path_owned_elsewhere_does_not_stand_for_registered_packages() -> None:
    idx = registry("github.com/a/plug/caddy", "example.com/team/plug")
    # once mapped to the registered packages "inside" them, these were built
    for path in ("github.com/v2/a/plug", "github.com/a/v2/plug", "example.com/v2/team"):
        mapped = idx.map_request(request(path))
        assert [p.path for p in mapped.plugins] == [path]
        assert refused(idx, path).startswith(f"{path} is not a registered")
    mapped = idx.map_request(request("github.com/a/plug/v2@v2.1.0"))
    assert [str(p) for p in mapped.plugins] == ["github.com/a/plug/v2/caddy@v2.1.0"]


@pytest.mark.parametrize("target", [
    "github.com/a",                 # a prefix of the registered path, not its module
    "github.com/v5/a",              # GitHub user "v5"
    "github.com/a/v2",              # the owner's repository "v2"
    "github.com/v2/a/plug",
    "github.com/a/plug/caddy/sub",  # a module below the registered package
    "example.com",
    "example.com/v2/team/plug",
])
def test_a_replacement_must_be_a_registered_packages_module(target: str) -> None:
    idx = registry("github.com/a/plug/caddy", "example.com/team/plug")
    message = refused(idx, "github.com/a/plug/caddy", replacements=(
        f"github.com/a/plug={target}@v1.0.0",))
    assert message.startswith(f"replacement github.com/a/plug={target}@v1.0.0: {target} is "
                              "not a registered Caddy module package path")


def test_a_replacement_by_a_registered_packages_module_is_admitted() -> None:
    idx = registry("github.com/a/plug/caddy", "example.com/team/plug", DNS_PROVIDER)
    targets = ["github.com/a/plug", "github.com/a/plug/caddy", "github.com/a/plug/v2",
               "example.com/team", "example.com/team/plug", DNS, "github.com/acme/dns"]
    idx.check(request("github.com/a/plug/caddy", replacements=tuple(
        f"example.com/old{i}={target}@v1.0.0" for i, target in enumerate(targets))))


def many(tmp_path: Path, count: int) -> Catalog:
    """Return a catalog whose module github.com/acme/many holds ``count`` packages."""
    file = tmp_path / "catalog.json"
    file.write_text(json.dumps([{"path": f"github.com/acme/many/p{i:03d}",
                                 "modules": [{"name": f"http.handlers.p{i:03d}"}]}
                                for i in range(count)]))
    return Catalog(store=None, file=file)


def test_a_mapping_past_max_plugins_is_refused(tmp_path: Path) -> None:
    catalog = many(tmp_path, DEFAULT_MAX_PLUGINS + 1)
    for allow in ("any", "registered"):
        with pytest.raises(SpecError) as info:
            CatalogPolicy(catalog, allow=allow).admit(request("github.com/acme/many"))
        assert info.value.field == "plugins"
        assert str(info.value).startswith(
            f"the plugins asked for stand for {DEFAULT_MAX_PLUGINS + 1} catalog packages "
            f"(github.com/acme/many is github.com/acme/many/p000, ")
        assert str(info.value).endswith(
            f"at most {DEFAULT_MAX_PLUGINS} plugins per build: name the packages you need")
    small = CatalogPolicy(many(tmp_path, 3), allow="registered", max_plugins=2)
    with pytest.raises(SpecError, match="stand for 3 catalog packages.*at most 2 plugins"):
        small.admit(request("github.com/acme/many"))
    assert len(CatalogPolicy(many(tmp_path, 2), allow="registered", max_plugins=2)
               .admit(request("github.com/acme/many")).plugins) == 2
    # a request the API took at its size is refused only for growing past it
    assert len(CatalogPolicy(many(tmp_path, 3), allow="registered", max_plugins=2).admit(
        request("http.handlers.p000", "github.com/acme/many/p001",
                "github.com/acme/many/p002")).plugins) == 3


def test_a_mapping_that_merges_plugins_keeps_every_replacement() -> None:
    idx = index()
    mapped = idx.map_request(request("dns.providers.example", DNS_PROVIDER, replacements=(
        f"{DNS}@v2.0.0={DNS}@v2.0.1", "github.com/acme/hello@v1.0.0=github.com/acme/hello@v1.0.1")))
    assert [p.path for p in mapped.plugins] == [DNS_PROVIDER]
    assert len(mapped.replacements) == 2
