"""Plans of ``kiln upgrade``/``add-package``/``remove-package`` and the atomic replacement.

The binary side (build information, ``list-modules``) runs for real in
tests/e2e/test_upgrade.py; here the plans are made from an ``Installed`` value and the
replacement works on real files.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from kiln.client.builds import ClientError
from kiln.client.install import replace_binary
from kiln.client.installed import Installed, Listed, Plugin, parse_list_modules
from kiln.client.upgrade import built_outcome, plan_add, plan_remove, plan_upgrade, planned_outcome
from kiln.gomod.buildinfo import BuildInfo
from tests.fixtures import goproxy as gp


def installed(path: Path = Path("/usr/bin/caddy"), goarch: str = "amd64",
              goarm: str = "") -> Installed:
    return Installed(path=path, info=BuildInfo("go1.25.0"), caddy_version="v2.7.6",
                     goos="linux", goarch=goarch, goarm=goarm,
                     plugins=(Plugin(gp.DNS, "v2.0.0", (gp.DNS_PACKAGE,)),
                              Plugin(gp.HELLO, "v0.1.0", (gp.HELLO,))))


def test_upgrade_asks_for_the_latest_caddy_and_pins_the_installed_plugins() -> None:
    body = plan_upgrade(installed()).body()
    assert body == {"os": "linux", "arch": "amd64", "caddy_version": "latest",
                    "plugins": [f"{gp.DNS_PACKAGE}@v2.0.0", f"{gp.HELLO}@v0.1.0"]}
    latest = plan_upgrade(installed(goarch="arm", goarm="7"), caddy="v2.8.0",
                          latest_plugins=True).body()
    assert latest["plugins"] == [gp.DNS_PACKAGE, gp.HELLO]
    assert (latest["caddy_version"], latest["arm"]) == ("v2.8.0", "7")


def test_add_package_keeps_caddy_and_the_plugins_and_refuses_what_is_there() -> None:
    body = plan_add(installed(), [f"https://{gp.MIXEDCASE}", f"{gp.NEEDSNEW}@v1.0.0"]).body()
    assert body["caddy_version"] == "v2.7.6"
    assert body["plugins"] == [f"{gp.DNS_PACKAGE}@v2.0.0", f"{gp.HELLO}@v0.1.0",
                               gp.MIXEDCASE, f"{gp.NEEDSNEW}@v1.0.0"]
    # another version of an installed module moves it, whether named by module or package
    for name in (gp.DNS, gp.DNS_PACKAGE):
        assert plan_add(installed(), [f"{name}@v2.1.0"]).body()["plugins"][0] == \
            f"{gp.DNS_PACKAGE}@v2.1.0"
    for again in (gp.HELLO, f"{gp.HELLO}@v0.1.0", gp.DNS):
        with pytest.raises(ClientError, match="already installed at") as caught:
            plan_add(installed(), [again])
        assert caught.value.code == 2
    with pytest.raises(ClientError, match="part of Caddy itself"):
        plan_add(installed(), ["github.com/caddyserver/caddy/v2@v2.8.4"])
    with pytest.raises(ClientError, match="more than one @"):
        plan_add(installed(), ["example.com/x@v1@v2"])


def test_remove_package_takes_a_version_too() -> None:
    # caddy remove-package deletes the raw argument, so mod@ver removes nothing
    assert plan_remove(installed(), [f"{gp.HELLO}@v0.1.0"]).body()["plugins"] == \
        [f"{gp.DNS_PACKAGE}@v2.0.0"]
    assert plan_remove(installed(), [gp.DNS]).body()["plugins"] == [f"{gp.HELLO}@v0.1.0"]
    with pytest.raises(ClientError, match=r"installed at v0\.1\.0, not v0\.2\.0"):
        plan_remove(installed(), [f"{gp.HELLO}@v0.2.0"])
    with pytest.raises(ClientError, match=rf"{gp.BROKEN} is not installed.*{gp.HELLO} v0.1.0"):
        plan_remove(installed(), [gp.BROKEN])


def test_plans_read_as_kept_added_removed_and_changed() -> None:
    plan = plan_add(installed(), [f"{gp.HELLO}@v0.2.0", gp.MIXEDCASE])
    text = planned_outcome(plan).render(plan.installed)
    assert "/usr/bin/caddy: Caddy v2.7.6 (kept) for linux/amd64" in text
    assert f"kept     {gp.DNS}" in text and "v2.0.0" in text
    assert "changed" in text and "v0.1.0 → v0.2.0" in text
    assert f"added    {gp.MIXEDCASE}" in text
    resolved = planned_outcome(plan_upgrade(installed(), latest_plugins=True), caddy="v2.8.4",
                               latest=lambda path: (gp.HELLO, "v0.2.0") if path == gp.HELLO
                               else None)
    first = resolved.render(installed()).splitlines()[0]
    assert first.endswith("v2.7.6 → v2.8.4 for linux/amd64")
    assert (gp.HELLO, "v0.1.0", "v0.2.0") in resolved.plugins
    doc = {"caddy_version": "v2.7.6", "plugins": [
        {"package": gp.DNS_PACKAGE, "module": gp.DNS, "version": "v2.0.0"}]}
    removed = built_outcome(plan_remove(installed(), [gp.HELLO]), doc)
    assert removed.changes
    assert re.search(rf"removed  {gp.HELLO} +v0.1.0", removed.render(installed()))
    unchanged = built_outcome(plan_upgrade(installed()), {**doc, "plugins": [
        *doc["plugins"], {"package": gp.HELLO, "module": gp.HELLO, "version": "v0.1.0"}]})
    assert not unchanged.changes


def test_list_modules_lines_as_caddy_prints_them() -> None:
    text = ("dns.providers.cloudflare v0.2.1 github.com/caddy-dns/cloudflare\n"
            "http.handlers.x v1.0.0 example.com/x => ../x\n"
            "http.handlers.bare\n"
            "http.handlers.odd [module not registered: odd]\n"
            "\n  Non-standard modules: 4\n\n  Unknown modules: 0\n")
    assert parse_list_modules(text) == [
        Listed("dns.providers.cloudflare", "v0.2.1", "github.com/caddy-dns/cloudflare"),
        Listed("http.handlers.x", "v1.0.0", "example.com/x", replaced=True),
        Listed("http.handlers.bare"),
        Listed("http.handlers.odd", error="module not registered: odd"),
    ]


def _binary(path: Path, text: str, mode: int = 0o750) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_replacing_keeps_the_mode_and_a_backup_only_when_asked(tmp_path: Path) -> None:
    target = _binary(tmp_path / "caddy", "old")
    new = _binary(tmp_path / ".caddy.new", "new", 0o600)
    seen = []
    replace_binary(target, new, backup=tmp_path / ".caddy.old", keep_backup=False,
                   check=lambda path: seen.append(path.read_text()))
    assert seen == ["new"] and target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert sorted(os.listdir(tmp_path)) == ["caddy"]
    replace_binary(target, _binary(tmp_path / ".caddy.new", "newer"),
                   backup=tmp_path / "caddy.bak", keep_backup=True, check=lambda path: None)
    assert target.read_text() == "newer" and (tmp_path / "caddy.bak").read_text() == "new"


def test_a_failed_check_puts_the_old_binary_back(tmp_path: Path) -> None:
    target = _binary(tmp_path / "caddy", "old")
    inode = target.stat().st_ino

    def refuse(path: Path) -> None:
        assert path.read_text() == "new"
        raise ClientError(1, "the new binary lacks a plugin")

    with pytest.raises(ClientError, match="lacks a plugin"):
        replace_binary(target, _binary(tmp_path / ".caddy.new", "new"),
                       backup=tmp_path / ".caddy.old", keep_backup=False, check=refuse)
    assert target.read_text() == "old" and target.stat().st_ino == inode
    assert sorted(os.listdir(tmp_path)) == ["caddy"]
