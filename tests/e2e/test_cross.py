"""Cross-compilation: every platform Kiln offers builds, and each binary is what it says.

One fetch of a Caddy with a plugin, then one compile step per platform through the
Builder, in the sandbox production uses (docker: without an engine the tests skip and
say so, or fail where Docker is required), with the shared Go caches: a platform's standard library is compiled
once per cache, so later runs only link.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from platform import machine

import pytest

from kiln.request.platforms import PLATFORMS
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import BuildFailure
from kiln.worker.sandbox.base import Sandbox
from tests import binfmt
from tests.dockerutil import ensure_sandbox_image
from tests.fixtures import goproxy as gp
from tests.sandboxes import builder, docker_sandbox, readable_proxy

pytestmark = pytest.mark.slow

CADDY_VERSION = "v2.8.0"
PLUGIN = ResolvedPlugin(gp.HELLO, gp.HELLO, "v0.1.0")
#: compile steps run at once: each is a chain of package compiles that leaves a core idle
COMPILE_CONCURRENCY = 2

Platform = tuple[str, str, str]
#: every (GOOS, GOARCH, GOARM) Kiln accepts, arm variants included
ALL_PLATFORMS: list[Platform] = [
    (os_, arch, arm) for (os_, arch), arms in sorted(PLATFORMS.items()) for arm in arms or ("",)
]
BIG_ENDIAN = {"mips", "mips64", "ppc64", "s390x"}
THIRTY_TWO_BIT = {"386", "arm", "mips", "mipsle"}
#: platform.machine() of a Linux host -> the GOARCH its binaries need
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def platform_id(platform: Platform) -> str:
    os_, arch, arm = platform
    return f"{os_}/{arch}" + (f"/v{arm}" if arm else "")


def spec_for(sandbox: Sandbox, platform: Platform) -> BuildSpec:
    os_, arch, arm = platform
    return BuildSpec(os=os_, arch=arch, arm=arm, caddy_version=CADDY_VERSION, plugins=(PLUGIN,),
                     replacements=(), go_version=sandbox.go_version(), sandbox=sandbox.identity)


@pytest.fixture(scope="module")
def sandbox(go_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Sandbox, Path]]:
    """Yield the sandbox production uses (docker) and a proxy it can read."""
    image = ensure_sandbox_image()  # skips with the reason where no engine answers
    proxy = readable_proxy(tmp_path_factory.mktemp("cross-proxy"))
    from kiln.worker.sandbox.docker_engine import docker_client

    client = docker_client(required=True)
    assert client is not None
    try:
        yield docker_sandbox(client, image, go_cache_dir, proxy,
                             worker_id=f"kiln-test-cross-{uuid.uuid4().hex[:8]}"), proxy
    finally:
        client.close()


@pytest.fixture(scope="module")
def built(sandbox: tuple[Sandbox, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[Platform, Path | str]:
    """Fetch once, then compile every platform; map each to its binary or its failure."""
    box, proxy = sandbox
    build = builder(box, proxy)
    root = tmp_path_factory.mktemp("cross")
    first = spec_for(box, ALL_PLATFORMS[0])
    fetched = root / "fetched"
    build.fetch(first, key=first.key(), workdir=fetched, log=lambda step, line: None)

    def compile_one(platform: Platform) -> Path | str:
        spec = spec_for(box, platform)
        # arm variants share a file name: each platform compiles in its own directory
        workdir = root / platform_id(platform).replace("/", "-")
        workdir.mkdir()
        for name in ("main.go", "go.mod", "go.sum"):
            shutil.copyfile(fetched / name, workdir / name)
        try:
            return build.compile(spec, key=spec.key(), workdir=workdir,
                                 log=lambda step, line: None).binary
        except BuildFailure as exc:
            return f"{exc.step} failed: {exc.message}"

    with ThreadPoolExecutor(COMPILE_CONCURRENCY) as pool:
        return dict(zip(ALL_PLATFORMS, pool.map(compile_one, ALL_PLATFORMS), strict=True))


def binary_of(built: dict[Platform, Path | str], platform: Platform) -> bytes:
    result = built[platform]
    assert isinstance(result, Path), f"{platform_id(platform)} did not build: {result}"
    return result.read_bytes()


@pytest.mark.parametrize("platform", ALL_PLATFORMS, ids=platform_id)
def test_every_platform_builds_for_itself(built: dict[Platform, Path | str],
                                          platform: Platform) -> None:
    os_, arch, arm = platform
    data = binary_of(built, platform)
    exe = binfmt.inspect(data)
    fmt = {"windows": "pe", "darwin": "macho"}.get(os_, "elf")
    assert (exe.format, exe.arch) == (fmt, arch)
    assert exe.bits == (32 if arch in THIRTY_TWO_BIT else 64)
    assert exe.byteorder == ("big" if arch in BIG_ENDIAN else "little")
    _version, settings = binfmt.build_info(data)
    assert (settings["GOOS"], settings["GOARCH"], settings.get("GOARM", "")) == platform
    assert settings["CGO_ENABLED"] == "0"
    assert settings["-trimpath"] == "true"
    assert settings["-tags"] == "nobadger,nomysql,nopgx"


def test_binaries_carry_the_format_and_machine_of_their_platform(
        built: dict[Platform, Path | str]) -> None:
    linux_amd64 = binfmt.inspect(binary_of(built, ("linux", "amd64", "")))
    assert (linux_amd64.format, linux_amd64.machine, linux_amd64.bits) == ("elf", 62, 64)
    assert linux_amd64.osabi == binfmt.ELFOSABI_NONE

    linux_arm64 = binfmt.inspect(binary_of(built, ("linux", "arm64", "")))
    assert (linux_arm64.format, linux_arm64.machine, linux_arm64.bits) == ("elf", 183, 64)

    arm6 = binary_of(built, ("linux", "arm", "6"))
    linux_arm = binfmt.inspect(arm6)
    assert (linux_arm.format, linux_arm.machine, linux_arm.bits) == ("elf", 40, 32)
    assert linux_arm.flags & binfmt.EF_ARM_EABIMASK == binfmt.EF_ARM_EABI_VER5
    assert binfmt.build_info(arm6)[1]["GOARM"] == "6"
    # the v6 and v7 builds differ only in what the build info and code say, not the header
    assert binfmt.build_info(binary_of(built, ("linux", "arm", "7")))[1]["GOARM"] == "7"

    windows = binfmt.inspect(binary_of(built, ("windows", "amd64", "")))
    assert (windows.format, windows.machine, windows.bits) == ("pe", 0x8664, 64)
    assert built["windows", "amd64", ""].name.endswith(".exe")  # type: ignore[union-attr]

    darwin = binfmt.inspect(binary_of(built, ("darwin", "arm64", "")))
    assert (darwin.format, darwin.machine) == ("macho", 0x0100000C)

    freebsd = binfmt.inspect(binary_of(built, ("freebsd", "amd64", "")))
    assert (freebsd.format, freebsd.machine, freebsd.osabi) == ("elf", 62, binfmt.ELFOSABI_FREEBSD)


def test_the_host_platform_binary_runs_and_holds_the_plugin(
        built: dict[Platform, Path | str], tmp_path: Path) -> None:
    arch = HOST_ARCH.get(machine())
    if sys.platform != "linux" or arch is None:
        pytest.skip(f"no Kiln platform runs on {sys.platform}/{machine()}")
    binary = tmp_path / "caddy"
    binary.write_bytes(binary_of(built, ("linux", arch, "")))
    binary.chmod(0o755)
    out = subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert f"{gp.HELLO_ID} v0.1.0" in out
