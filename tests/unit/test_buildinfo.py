"""Reading Go build information from binaries in pure Python (kiln/gomod/buildinfo.py).

Real binaries only: the go command itself, and (marked slow) a tiny program
(testdata/buildinfo: a module dependency from the synthetic proxy, one replaced by a local
directory, a package with a dot in its name) built by the real toolchain for several
platforms; each is read and compared with what ``go version -m`` says of it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kiln.gomod.buildinfo import (
    MAGIC,
    NotGoBinary,
    decode_build_info,
    init_packages,
    parse_go_version_m,
    read_build_info,
)
from kiln.worker.sandbox.process import find_go
from tests.fixtures import goproxy as gp

TESTDATA = Path(__file__).parent / "testdata" / "buildinfo"
#: (GOOS, GOARCH, GOARM): ELF, ELF with GOARM, PE and Mach-O
PLATFORMS = [("linux", "amd64", ""), ("linux", "arm", "6"), ("windows", "amd64", ""),
             ("darwin", "arm64", "")]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny program (go build writes its go.sum)."""
    return Path(shutil.copytree(TESTDATA, tmp_path_factory.mktemp("tiny") / "src"))


def go_build(source: Path, out: Path, *, proxy_dir: Path, cache: Path, goos: str,
             goarch: str, goarm: str = "", stripped: bool = True) -> Path:
    env = gp.go_env(f"file://{proxy_dir}", cache, GOOS=goos, GOARCH=goarch)
    if goarm:
        env["GOARM"] = goarm
    flags = ["-trimpath", "-ldflags=-w -s"] if stripped else []
    subprocess.run([str(find_go()), "build", *flags, "-o", str(out), "."], cwd=source,
                   env=env, check=True, capture_output=True, timeout=600)
    return out


def go_version_m(binary: Path) -> str:
    return subprocess.run([str(find_go()), "version", "-m", str(binary)], capture_output=True,
                          text=True, check=True, timeout=60,
                          env={"GOTOOLCHAIN": "local", "HOME": "/tmp"}).stdout


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: "/".join(filter(None, p)))
def test_a_stripped_binary_reads_as_go_version_m_reads_it(
        platform: tuple[str, str, str], source: Path, proxy_dir: Path, go_cache_dir: Path,
        tmp_path: Path) -> None:
    goos, goarch, goarm = platform
    binary = go_build(source, tmp_path / "tiny", proxy_dir=proxy_dir, cache=go_cache_dir,
                      goos=goos, goarch=goarch, goarm=goarm)
    info = read_build_info(binary)
    assert info == parse_go_version_m(go_version_m(binary))
    assert info.go_version.startswith("go1.") and info.path == "example.com/tiny"
    assert (info.setting("GOOS"), info.setting("GOARCH")) == (goos, goarch)
    assert info.setting("GOARM") == (goarm or None)
    assert info.setting("-trimpath") == "true"
    util = info.dep(gp.UTIL)
    assert util is not None and util.version == gp.UTIL_VERSION and util.sum.startswith("h1:")
    forked = info.dep("example.com/forked")
    assert forked is not None and forked.replace is not None
    assert (forked.version, forked.replace.path) == ("v1.0.0", "./forked")


@pytest.mark.slow
def test_packages_with_an_init_function_are_found_in_a_stripped_binary(
        source: Path, proxy_dir: Path, go_cache_dir: Path, tmp_path: Path) -> None:
    binary = go_build(source, tmp_path / "tiny", proxy_dir=proxy_dir, cache=go_cache_dir,
                      goos="linux", goarch="amd64")
    assert subprocess.run([str(binary)], capture_output=True, text=True, check=True,
                          timeout=30).stdout == "Hello, forked! [sub.v2] 4\n"
    packages = init_packages(binary.read_bytes())
    # the dot in sub.v2 is written %2e in the function name
    assert {"example.com/tiny/sub.v2", "example.com/forked"} <= packages
    assert "example.com/tiny/noinit" not in packages and gp.UTIL not in packages


@pytest.mark.slow
def test_an_unstripped_binary_reads_the_same(source: Path, proxy_dir: Path,
                                             go_cache_dir: Path, tmp_path: Path) -> None:
    binary = go_build(source, tmp_path / "tiny", proxy_dir=proxy_dir, cache=go_cache_dir,
                      goos="linux", goarch="amd64", stripped=False)
    assert read_build_info(binary) == parse_go_version_m(go_version_m(binary))


def test_the_go_command_reads_as_go_version_m_reads_it() -> None:
    # the go command reads build information itself, so it holds the magic bytes twice
    go = find_go()
    assert go.read_bytes().count(MAGIC) > 1
    info = read_build_info(go)
    assert info == parse_go_version_m(go_version_m(go)) and info.path == "cmd/go"


def test_files_that_are_not_readable_go_binaries_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "caddy"
    text.write_text("#!/bin/sh\necho caddy\n")
    with pytest.raises(NotGoBinary, match=r"caddy is not a Go binary.*no Go build information"):
        read_build_info(text)
    c_program = Path(shutil.which("true") or "/bin/true")
    with pytest.raises(NotGoBinary, match="no Go build information"):
        read_build_info(c_program)
    data = find_go().read_bytes()
    at = data.find(MAGIC)
    with pytest.raises(NotGoBinary, match="cut off|past the end"):
        decode_build_info(data[: at + 40])
    # Go before 1.18 pointed at the strings from the header (flags bit 2 clear)
    old = bytearray(data)
    old[at + 15] &= ~0x2
    with pytest.raises(NotGoBinary, match="older than 1.18"):
        decode_build_info(bytes(old))
