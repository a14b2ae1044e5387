"""Check the synthetic Go module proxy against a real Go toolchain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import goproxy as gp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

MAIN_GO = """package main

import (
\tcaddycmd "{caddy}/cmd"

\t_ "{caddy}/modules/standard"
{plugins}
)

func main() {{
\tcaddycmd.Main()
}}
"""


@pytest.fixture(scope="session")
def go() -> Path:
    """Return the Go toolchain, or skip."""
    try:
        return gp.find_go()
    except gp.GoNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def proxy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a generated proxy tree shared by the session."""
    return gp.generate(tmp_path_factory.mktemp("goproxy"))


@pytest.fixture(scope="session")
def go_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Return module and build caches shared by the session, removed afterwards."""
    path = tmp_path_factory.mktemp("gocache")
    yield path
    gp.remove_tree(path)


def run_go(
    go: Path, args: list[str], cwd: Path, proxy: str, cache: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run go with ``args`` against ``proxy``; fail the test with its output when check fails."""
    env = gp.go_env(proxy, cache)
    proc = subprocess.run(
        [str(go), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        pytest.fail(f"go {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def init_main(go: Path, workdir: Path, proxy: str, cache: Path, packages: list[str]) -> None:
    """Write an xcaddy-style main module importing ``packages`` into ``workdir``."""
    workdir.mkdir(parents=True)
    plugins = "".join(f'\t_ "{p}"\n' for p in packages)
    (workdir / "main.go").write_text(MAIN_GO.format(caddy=gp.CADDY, plugins=plugins.rstrip("\n")))
    run_go(go, ["mod", "init", "caddy"], workdir, proxy, cache)


def file_url(root: Path) -> str:
    """Return the file:// GOPROXY URL of a tree."""
    return root.resolve().as_uri()


# -- the tree -------------------------------------------------------------------------------


def test_tree_is_deterministic_fast_and_idempotent(tmp_path: Path) -> None:
    """Generate in-process and from the command line: same bytes; again: skipped."""
    start = time.monotonic()
    a = gp.generate(tmp_path / "a")
    assert time.monotonic() - start < 1.0
    cli = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.goproxy", str(tmp_path / "b")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    b = tmp_path / "b"
    assert cli.stdout == f"{b.resolve().as_uri()}\n"
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel

    info = a / gp.proxy_path(gp.CADDY, f"@v/{gp.CADDY_LATEST}.info")
    mtime = info.stat().st_mtime_ns
    os.utime(info, ns=(mtime - 10**9, mtime - 10**9))
    gp.generate(a)
    assert info.stat().st_mtime_ns == mtime - 10**9  # up to date: nothing rewritten


def test_tree_follows_the_proxy_protocol(proxy_root: Path) -> None:
    """Lists, infos, @latest, case encoding and zip layout match what Go expects."""
    caddy = proxy_root / gp.proxy_path(gp.CADDY, "")
    assert (caddy / "@v/list").read_text().split() == list(gp.CADDY_VERSIONS)
    assert gp.MASTER_PSEUDO not in (caddy / "@v/list").read_text()
    assert json.loads((caddy / "@latest").read_text())["Version"] == gp.CADDY_LATEST
    pseudo = json.loads((caddy / f"@v/{gp.MASTER_PSEUDO}.info").read_text())
    assert pseudo == {"Version": gp.MASTER_PSEUDO, "Time": gp.MASTER_TIME}

    prefixes = [c[:7] for c in gp.COMMITS[gp.CADDY]]
    assert len(set(prefixes)) == len(prefixes)
    assert gp.MASTER_COMMIT_FULL.startswith(gp.MASTER_COMMIT)
    assert gp.MASTER_PSEUDO.endswith(f"-{gp.MASTER_COMMIT}")

    assert gp.escape_path(gp.MIXEDCASE) == gp.MIXEDCASE_ESCAPED
    assert gp.unescape_path(gp.MIXEDCASE_ESCAPED) == gp.MIXEDCASE
    assert (proxy_root / gp.MIXEDCASE_ESCAPED / "@v/list").read_text() == "v1.0.0\n"

    for module, versions in gp.MODULES.items():
        for version in versions:
            base = proxy_root / gp.proxy_path(module, f"@v/{version}")
            with zipfile.ZipFile(f"{base}.zip") as zf:
                names = zf.namelist()
                assert names and all(n.startswith(f"{module}@{version}/") for n in names)
                assert zf.read(f"{module}@{version}/go.mod") == Path(f"{base}.mod").read_bytes()
                assert {zi.date_time for zi in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_publish_adds_a_release_and_generate_restores(tmp_path: Path) -> None:
    """publish() makes a new latest; generate() puts the original tree back."""
    root = gp.generate(tmp_path / "proxy")
    gp.publish(root, gp.CADDY, "v2.8.5", time="2024-09-01T00:00:00Z")
    caddy = root / gp.proxy_path(gp.CADDY, "")
    assert (caddy / "@v/list").read_text().split()[-1] == "v2.8.5"
    assert json.loads((caddy / "@latest").read_text())["Version"] == "v2.8.5"
    gp.generate(root)
    assert not (caddy / "@v/v2.8.5.zip").exists()
    assert json.loads((caddy / "@latest").read_text())["Version"] == gp.CADDY_LATEST


# -- building with Go --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_caddy(
    go: Path, proxy_root: Path, go_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Build a Caddy v2.8.0 with hello and dns the way xcaddy does; return the binary."""
    work = tmp_path_factory.mktemp("build") / "caddy"
    proxy = file_url(proxy_root)
    init_main(go, work, proxy, go_cache, [gp.HELLO, gp.DNS_PACKAGE])
    core = f"{gp.CADDY}@v2.8.0"
    run_go(go, ["get", core], work, proxy, go_cache)
    for plugin in (gp.HELLO, gp.DNS_PACKAGE):
        run_go(go, ["get", f"{plugin}@latest", core], work, proxy, go_cache)
    run_go(go, ["get", core, gp.HELLO, gp.DNS_PACKAGE], work, proxy, go_cache)
    run_go(go, ["mod", "tidy", "-e"], work, proxy, go_cache)
    build = ["build", "-o", "caddy", "-trimpath", "-ldflags", "-w -s"]
    run_go(go, build, work, proxy, go_cache)
    return work / "caddy"


def caddy_run(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the built binary."""
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


def test_list_modules_shows_standard_and_plugins(built_caddy: Path) -> None:
    """list-modules --versions prints what real Caddy would for this build."""
    out = caddy_run(built_caddy, "list-modules", "--versions")
    assert out.returncode == 0, out.stderr
    standard = "".join(f"{m} v2.8.0\n" for m in gp.STANDARD_MODULES)
    plugins = f"{gp.DNS_ID} {gp.DNS_LATEST}\n{gp.HELLO_ID} {gp.HELLO_LATEST}\n"
    assert out.stdout == (
        f"{standard}\n  Standard modules: 2\n\n{plugins}\n"
        "  Non-standard modules: 2\n\n  Unknown modules: 0\n"
    )
    packages = caddy_run(built_caddy, "list-modules", "--packages").stdout.splitlines()
    assert f"{gp.DNS_ID} {gp.DNS}" in packages
    assert f"{gp.HELLO_ID} {gp.HELLO}" in packages


def test_version_and_build_info_tell_the_linked_versions(built_caddy: Path) -> None:
    """Version is the linked core's; build-info shows the transitive dependency."""
    version = caddy_run(built_caddy, "version")
    assert re.fullmatch(r"v2\.8\.0 h1:\S+=\n", version.stdout), version.stdout
    info = caddy_run(built_caddy, "build-info").stdout
    assert f"dep\t{gp.UTIL}\t{gp.UTIL_VERSION}\t" in info
    assert f"dep\t{gp.CADDY}\tv2.8.0\t" in info
    bad = caddy_run(built_caddy, "frobnicate")
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_plugin_needing_newer_caddy_conflicts(
    go: Path, proxy_root: Path, go_cache: Path, tmp_path: Path
) -> None:
    """Pinning core below what a plugin requires fails with Go's conflict message."""
    work = tmp_path / "conflict"
    proxy = file_url(proxy_root)
    init_main(go, work, proxy, go_cache, [gp.NEEDSNEW])
    pin = [f"{gp.NEEDSNEW}@{gp.NEEDSNEW_VERSION}", f"{gp.CADDY}@{gp.CADDY_OLDEST}"]
    proc = run_go(go, ["get", *pin], work, proxy, go_cache, check=False)
    assert proc.returncode != 0
    assert (
        f"{gp.NEEDSNEW}@{gp.NEEDSNEW_VERSION} requires {gp.CADDY}@{gp.NEEDSNEW_REQUIRES}, "
        f"not {gp.CADDY}@{gp.CADDY_OLDEST}"
    ) in proc.stderr


def test_broken_plugin_fails_to_compile(
    go: Path, proxy_root: Path, go_cache: Path, tmp_path: Path
) -> None:
    """The broken plugin downloads fine and fails go build with its type error."""
    work = tmp_path / "broken"
    proxy = file_url(proxy_root)
    init_main(go, work, proxy, go_cache, [gp.BROKEN])
    run_go(go, ["get", f"{gp.BROKEN}@{gp.BROKEN_VERSION}"], work, proxy, go_cache)
    run_go(go, ["mod", "tidy", "-e"], work, proxy, go_cache)
    proc = run_go(go, ["build", "-trimpath", "-o", "caddy"], work, proxy, go_cache, check=False)
    assert proc.returncode != 0
    assert gp.BROKEN_ERROR in proc.stderr
    assert f"# {gp.BROKEN}" in proc.stderr


def test_mixed_case_module_downloads(
    go: Path, proxy_root: Path, go_cache: Path, tmp_path: Path
) -> None:
    """Go finds and verifies the case-encoded module."""
    proxy = file_url(proxy_root)
    args = ["mod", "download", "-json", f"{gp.MIXEDCASE}@latest"]
    info = json.loads(run_go(go, args, tmp_path, proxy, go_cache).stdout)
    assert info["Version"] == gp.MIXEDCASE_VERSION
    assert info["Sum"].startswith("h1:")
    assert (Path(info["Dir"]) / "mixedcase.go").is_file()


# -- over HTTP -------------------------------------------------------------------------------


def test_http_proxy_resolves_branches_and_commits(
    go: Path, proxy_root: Path, go_cache: Path, tmp_path: Path
) -> None:
    """Go resolves @master and commit prefixes through the HTTP proxy; latest skips betas."""
    with gp.serve(proxy_root) as server:
        for query in ("master", "abcdef1", gp.MASTER_COMMIT, gp.MASTER_COMMIT_FULL, "latest"):
            args = ["list", "-m", "-json", f"{gp.CADDY}@{query}"]
            info = json.loads(run_go(go, args, tmp_path, server.url, go_cache).stdout)
            want = gp.CADDY_LATEST if query == "latest" else gp.MASTER_PSEUDO
            assert info["Version"] == want, query
        assert server.count(gp.proxy_path(gp.CADDY, "@v/master.info")) == 1
        assert server.count(gp.proxy_path(gp.CADDY, "@v/abcdef1.info")) == 1

        args = ["list", "-m", "-json", f"{gp.CADDY}@nosuchbranch"]
        proc = run_go(go, args, tmp_path, server.url, go_cache, check=False)
        assert proc.returncode != 0 and "unknown revision nosuchbranch" in proc.stderr

        server.fail_next(1, status=503)
        args = ["list", "-m", "-json", f"{gp.CADDY}@latest"]
        proc = run_go(go, args, tmp_path, server.url, go_cache, check=False)
        assert proc.returncode != 0 and "503" in proc.stderr
        run_go(go, args, tmp_path, server.url, go_cache)


def test_http_proxy_counts_and_fails_on_request(proxy_root: Path) -> None:
    """Serve files, 404 the rest, count every request and fail when told to."""
    list_path = gp.proxy_path(gp.CADDY, "@v/list")
    with gp.serve(proxy_root) as server:

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"{server.url}/{path}", timeout=10) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert get(list_path) == (200, (proxy_root / list_path).read_bytes())
        assert get(gp.proxy_path(gp.MIXEDCASE, "@latest"))[0] == 200
        assert get(gp.proxy_path(gp.CADDY, "@v/v9.9.9.zip"))[0] == 404
        assert get("github.com/nobody/nothing/@v/list")[0] == 404
        assert get("../../etc/@v/list")[0] == 404
        assert get(gp.STAMP_NAME)[0] == 404
        assert get(gp.proxy_path(gp.CADDY, "@v/!!bad.info"))[0] == 404
        assert get(gp.proxy_path(gp.CADDY, "@v/abcdef.info"))[0] == 404  # prefix too short

        server.fail_next(2, status=503, path="/@v/list")
        assert get(gp.proxy_path(gp.HELLO, "@latest"))[0] == 200
        assert get(list_path)[0] == 503
        assert get(list_path)[0] == 503
        assert get(list_path)[0] == 200
        assert server.count(list_path) == 4
        assert server.count("/" + list_path) == 4

        server.fail_next(1, status=0)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(list_path)
        assert get(list_path)[0] == 200

        server.reset_counts()
        assert server.total == 0
        url = server.url
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{url}/{list_path}", timeout=5)
