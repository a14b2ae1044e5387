"""``kiln upgrade``, ``add-package`` and ``remove-package`` on real binaries, real servers.

A real Kiln (gunicorn + worker, signing with a key made by openssl) builds a synthetic
Caddy from the synthetic module proxy; each test changes its own copy of that binary with
the ``kiln`` command, as a user runs it, and asserts what the user sees: exit code,
messages, the file, and what the binary itself answers to ``version`` and ``list-modules``.
The last test does the same with the real Caddy from the real module proxy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests import realcaddy as rc
from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses, free_port, template_database

pytestmark = pytest.mark.slow

ORIGINAL_PLUGINS = (f"{gp.HELLO}@v0.1.0", f"{gp.DNS_PACKAGE}@v2.0.0")
#: a Caddy, its plugins and their Go modules, as the original binary's list-modules shows
ORIGINAL_MODULES = {gp.HELLO_ID: "v0.1.0", gp.DNS_ID: "v2.0.0"}
#: real builds of Caddy take minutes on a small machine
REAL_BUILD_TIMEOUT = 3600.0


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], capture_output=True, check=True, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ed25519 private keys: the main Kiln's and another Kiln's."""
    root = tmp_path_factory.mktemp("upgrade-keys")
    for name in ("main", "other"):
        openssl("genpkey", "-algorithm", "ed25519", "-out", str(root / f"{name}.pem"))
    return {"main": root / "main.pem", "other": root / "other.pem"}


def start(name: str, *, root: Path, pg_server_url: str, pg_template: str, goproxy: str,
          cache_dir: Path, key: Path, env: dict[str, str] | None = None) -> KilnProcesses:
    url = template_database(pg_server_url, pg_template, name)
    return KilnProcesses(db_url=url, root=root, goproxy=goproxy, cache_dir=cache_dir,
                         env={"KILN_SIGNING__KEY_FILE": str(key), **(env or {})})


@pytest.fixture(scope="module")
def kiln_goproxy(proxy_server: gp.ProxyServer) -> str:
    return proxy_server.url


@pytest.fixture(scope="module")
def kiln_env(keys: dict[str, Path]) -> dict[str, str]:
    return {"KILN_SIGNING__KEY_FILE": str(keys["main"])}


def kiln_cmd(server: str | None, *args: str | Path, path: str = "",
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path or os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "HOME": os.environ.get("HOME", "/root")}
    if server is not None:
        env["KILN_SERVER"] = server
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def caddy_modules(binary: Path) -> dict[str, str]:
    """Return the binary's non-standard Caddy modules and their versions, as it lists them."""
    out = subprocess.run([str(binary), "list-modules", "--versions", "--skip-standard"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split()[:2] for line in out.splitlines()  # type: ignore[misc]
                if line and not line.startswith(" "))


def caddy_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return out.split()[0]


def build(server: str, out: Path, *args: str, timeout: float = 600) -> Path:
    """Build with ``kiln build --wait -o``; return the binary."""
    result = kiln_cmd(server, "build", *args, "--wait", "-o", out, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def original(kiln: KilnProcesses, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caddy v2.7.6 with hello v0.1.0 and the dns plugin (registered from a subpackage)."""
    out = tmp_path_factory.mktemp("original") / "caddy"
    plugins = [arg for p in ORIGINAL_PLUGINS for arg in ("-p", p)]
    build(kiln.url, out, "--os", "linux", "--arch", "amd64", "--caddy", gp.CADDY_OLDEST,
          *plugins)
    assert caddy_modules(out) == ORIGINAL_MODULES
    return out


@pytest.fixture
def caddy(original: Path, tmp_path: Path) -> Path:
    """This test's own installed copy of the original binary, alone in its directory."""
    target = tmp_path / "bin" / "caddy"
    target.parent.mkdir()
    shutil.copy2(original, target)
    return target


def unchanged(binary: Path, original: Path) -> bool:
    return binary.read_bytes() == original.read_bytes() and os.listdir(binary.parent) == [
        binary.name]


def test_add_package_adds_a_plugin_and_keeps_caddy_and_the_others(
        kiln: KilnProcesses, caddy: Path) -> None:
    result = kiln_cmd(kiln.url, "add-package", "--binary", caddy, gp.MIXEDCASE)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"{caddy}: Caddy {gp.CADDY_OLDEST} (kept) for linux/amd64" in out
    assert f"added    {gp.MIXEDCASE}" in out and "kept     github.com/kiln-fixtures/dns/v2" in out
    # checked before it was installed, then asked what it holds
    assert "OK     signature: ed25519" in out and "OK     provenance: subject" in out
    assert "\nverified\n" in out and f"installed {caddy}: Caddy {gp.CADDY_OLDEST}" in out
    assert caddy_version(caddy) == gp.CADDY_OLDEST
    assert caddy_modules(caddy) == {**ORIGINAL_MODULES, gp.MIXEDCASE_ID: gp.MIXEDCASE_VERSION}
    assert os.listdir(caddy.parent) == ["caddy"]  # no backup, no download left behind
    assert os.access(caddy, os.X_OK)
    # not a terminal: the build's progress comes as plain lines
    assert "step: compile" in result.stderr and "\x1b[" not in result.stderr


def test_remove_package_takes_a_version_and_keeps_a_subpackage_plugin(
        kiln: KilnProcesses, caddy: Path, original: Path) -> None:
    wrong = kiln_cmd(kiln.url, "remove-package", "-b", caddy, f"{gp.HELLO}@v0.2.0")
    assert wrong.returncode == 2
    assert f"{gp.HELLO} is installed at v0.1.0, not v0.2.0" in wrong.stderr
    assert unchanged(caddy, original)
    # caddy's own remove-package removes nothing when given module@version
    result = kiln_cmd(kiln.url, "remove-package", "-b", caddy, f"{gp.HELLO}@v0.1.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed  {gp.HELLO}" in result.stdout
    # the dns plugin registers from a subpackage of its module: it is kept
    assert caddy_modules(caddy) == {gp.DNS_ID: "v2.0.0"}
    assert caddy_version(caddy) == gp.CADDY_OLDEST


def test_upgrade_takes_the_latest_caddy_and_keeps_plugin_versions_and_a_backup(
        kiln: KilnProcesses, caddy: Path, original: Path) -> None:
    # no PATH argument: the caddy on PATH
    path = f"{caddy.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    result = kiln_cmd(kiln.url, "upgrade", "--keep-backup", path=path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Caddy {gp.CADDY_OLDEST} → {gp.CADDY_LATEST} for linux/amd64" in result.stdout
    assert f"version: {gp.CADDY_LATEST} h1:" in result.stdout
    assert caddy_version(caddy) == gp.CADDY_LATEST
    assert caddy_modules(caddy) == ORIGINAL_MODULES  # not moved to hello v0.2.0, dns v2.1.0
    backup = caddy.with_name("caddy.bak")
    assert backup.read_bytes() == original.read_bytes()
    assert f"the old binary is {backup}" in result.stdout
    upgraded = caddy.read_bytes()
    again = kiln_cmd(kiln.url, "upgrade", caddy)
    assert again.returncode == 0, again.stderr
    assert f"Caddy {gp.CADDY_LATEST} is the latest: nothing to do" in again.stdout
    assert caddy.read_bytes() == upgraded


def test_dry_run_prints_the_plan_and_changes_nothing(
        kiln: KilnProcesses, caddy: Path, original: Path) -> None:
    def builds() -> list[str]:
        doc = requests.get(f"{kiln.url}/api/builds", params={"limit": 100}, timeout=10).json()
        return [b["key"] for b in doc["builds"]]

    before, mtime = builds(), caddy.stat().st_mtime_ns
    result = kiln_cmd(kiln.url, "upgrade", caddy, "--dry-run", "--latest-plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{caddy}: Caddy {gp.CADDY_OLDEST} → {gp.CADDY_LATEST} for linux/amd64"
    assert any(line.startswith(f"  changed  {gp.HELLO} ") and line.endswith("v0.1.0 → v0.2.0")
               for line in lines), result.stdout
    assert any(line.startswith(f"  changed  {gp.DNS} ") and line.endswith("v2.0.0 → v2.1.0")
               for line in lines), result.stdout
    assert lines[-1] == "dry run: nothing was built or changed"
    added = kiln_cmd(kiln.url, "add-package", "-b", caddy, "--dry-run", gp.NEEDSNEW)
    assert added.returncode == 0, added.stderr
    assert f"added    {gp.NEEDSNEW}" in added.stdout and gp.NEEDSNEW_VERSION in added.stdout
    assert builds() == before
    assert caddy.stat().st_mtime_ns == mtime and unchanged(caddy, original)


def test_a_failed_build_leaves_the_binary_as_it_was(
        kiln: KilnProcesses, caddy: Path, original: Path) -> None:
    result = kiln_cmd(kiln.url, "add-package", "-b", caddy, gp.BROKEN)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stderr and "cannot use" in result.stderr
    assert f"{caddy} was not changed" in result.stderr
    assert unchanged(caddy, original)


def test_a_new_binary_without_the_plugin_asked_for_is_rolled_back(
        kiln: KilnProcesses, caddy: Path, original: Path) -> None:
    # util builds but registers no Caddy module: the plugin would be silently missing
    result = kiln_cmd(kiln.url, "add-package", "-b", caddy, "--keep-backup", gp.UTIL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "\nverified\n" in result.stdout  # it got as far as installing...
    assert f"version: {gp.CADDY_OLDEST}" in result.stdout  # ...and asking the new binary
    assert f"the new binary has no Caddy module from {gp.UTIL}" in result.stderr
    assert f"restored the old {caddy}" in result.stderr
    assert unchanged(caddy, original)
    assert caddy_modules(caddy) == ORIGINAL_MODULES


def test_a_build_signed_with_another_key_is_not_installed(
        kiln: KilnProcesses, caddy: Path, original: Path, keys: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
        proxy_server: gp.ProxyServer, go_cache_dir: Path) -> None:
    other = start("kiln_upgrade_other", root=tmp_path_factory.mktemp("upgrade-other"),
                  pg_server_url=pg_server_url, pg_template=pg_template,
                  goproxy=proxy_server.url, cache_dir=go_cache_dir, key=keys["other"])
    with other.running():
        # the other server builds and signs; the key trusted is the main server's
        result = kiln_cmd(other.url, "upgrade", caddy, "--key", kiln.url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED signature: does not verify with the key given" in result.stdout
    assert "FAILED provenance" in result.stdout and "NOT verified" in result.stdout
    assert f"did not verify: {caddy} was not changed" in result.stderr
    assert unchanged(caddy, original)


def test_what_kiln_cannot_rebuild_is_refused_with_the_reason(
        kiln: KilnProcesses, caddy: Path, original: Path, tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\necho v2.8.4\n")
    text.chmod(0o755)
    refused = kiln_cmd(kiln.url, "upgrade", text)
    assert refused.returncode == 2 and "is not a Go binary" in refused.stderr
    replaced = build(kiln.url, tmp_path / "replaced", "--os", "linux", "--arch", "amd64",
                     "-p", f"{gp.HELLO}@v0.1.0",
                     "--replace", f"{gp.HELLO}@v0.1.0={gp.HELLO}@v0.2.0")
    refused = kiln_cmd(kiln.url, "upgrade", replaced)
    assert refused.returncode == 2, refused.stderr
    assert f"replaced modules, which a rebuild cannot keep: {gp.HELLO} v0.1.0 => " \
           f"{gp.HELLO} v0.2.0" in refused.stderr
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        arm64 = build(kiln.url, tmp_path / "arm64", "--os", "linux", "--arch", "arm64",
                      "--caddy", gp.CADDY_OLDEST, "-p", f"{gp.HELLO}@v0.1.0")
        refused = kiln_cmd(kiln.url, "add-package", "-b", arm64, gp.MIXEDCASE)
        assert refused.returncode == 2, refused.stderr
        assert "is Caddy for linux/arm64 and cannot run on this machine" in refused.stderr
    again = kiln_cmd(kiln.url, "add-package", "-b", caddy, gp.HELLO)
    assert again.returncode == 2
    assert f"{gp.HELLO} is already installed at v0.1.0" in again.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    down = kiln_cmd(None, "upgrade", caddy, "--server", nobody)
    assert down.returncode == 3 and nobody in down.stderr
    assert unchanged(caddy, original)


# -- the real Caddy ------------------------------------------------------------------------

REAL_CADDY = rc.CADDY_PINNED
CLOUDFLARE = rc.CLOUDFLARE[0]
RATELIMIT = rc.RATELIMIT[0]


def test_real_caddy_upgrade_and_add_package(
        tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
        real_cache_dir: Path, keys: dict[str, Path]) -> None:
    """Caddy v2.10.2 with cloudflare, upgraded to the latest Caddy, then given ratelimit."""
    real = start("kiln_upgrade_real", root=tmp_path_factory.mktemp("upgrade-real"),
                 pg_server_url=pg_server_url, pg_template=pg_template,
                 goproxy=rc.GOPROXY, cache_dir=real_cache_dir, key=keys["main"],
                 env={"KILN_BUILD__GOSUMDB": rc.GOSUMDB})
    binary = tmp_path_factory.mktemp("upgrade-real-bin") / "caddy"
    real_latest = rc.newest_caddy()
    timings: dict[str, float] = {}
    with real.running():
        started = time.monotonic()
        build(real.url, binary, "--os", "linux", "--arch", "amd64", "--caddy", REAL_CADDY,
              "-p", rc.pin(rc.CLOUDFLARE), timeout=REAL_BUILD_TIMEOUT)
        timings["build"] = time.monotonic() - started
        assert caddy_version(binary) == REAL_CADDY
        assert caddy_modules(binary) == {"dns.providers.cloudflare": "v0.2.1"}

        started = time.monotonic()
        upgraded = kiln_cmd(real.url, "upgrade", binary, timeout=REAL_BUILD_TIMEOUT)
        timings["upgrade"] = time.monotonic() - started
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr[-3000:]
        assert f"Caddy {REAL_CADDY} → {real_latest} for linux/amd64" in upgraded.stdout
        assert caddy_version(binary) == real_latest
        assert caddy_modules(binary) == {"dns.providers.cloudflare": "v0.2.1"}

        started = time.monotonic()
        added = kiln_cmd(real.url, "add-package", "-b", binary, rc.pin(rc.RATELIMIT),
                         timeout=REAL_BUILD_TIMEOUT)
        timings["add-package"] = time.monotonic() - started
        assert added.returncode == 0, added.stdout + added.stderr[-3000:]
        assert f"added    {RATELIMIT}" in added.stdout
        assert caddy_version(binary) == real_latest
        modules = caddy_modules(binary)
        assert modules["dns.providers.cloudflare"] == "v0.2.1"
        assert modules["http.handlers.rate_limit"] == "v0.1.0"
        assert os.listdir(binary.parent) == ["caddy"]
    print("real Caddy timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
