"""The platforms Kiln builds for (GOOS/GOARCH/GOARM)."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.errors import SpecError, _plain

# (GOOS, GOARCH) -> allowed GOARM values; empty for architectures that take none.
PLATFORMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("linux", "386"): (),
    ("linux", "amd64"): (),
    ("linux", "arm64"): (),
    ("linux", "arm"): ("5", "6", "7"),
    ("linux", "mips"): (),
    ("linux", "mipsle"): (),
    ("linux", "mips64"): (),
    ("linux", "mips64le"): (),
    ("linux", "ppc64"): (),
    ("linux", "ppc64le"): (),
    ("linux", "riscv64"): (),
    ("linux", "s390x"): (),
    ("linux", "loong64"): (),
    ("darwin", "amd64"): (),
    ("darwin", "arm64"): (),
    ("windows", "amd64"): (),
    ("windows", "arm64"): (),
    ("freebsd", "amd64"): (),
    ("freebsd", "arm"): ("6", "7"),
    ("freebsd", "arm64"): (),
    ("openbsd", "amd64"): (),
    ("openbsd", "arm"): ("6", "7"),
    ("openbsd", "arm64"): (),
    ("dragonfly", "amd64"): (),
}
DEFAULT_ARM = "7"
# Platforms people ask for that Go itself can no longer build, with the reason.
_REFUSED_PLATFORMS: dict[tuple[str, str], str] = {
    ("windows", "arm"): "Go no longer builds windows/arm (32-bit); choose windows/arm64",
}


def _platform_list(os_: str | None = None) -> str:
    keys = sorted(k for k in PLATFORMS if os_ is None or k[0] == os_)
    return ", ".join(f"{o}/{a}" for o, a in keys)


def _arm_choices(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_platform(os: object, arch: object, arm: object = None) -> tuple[str, str, str]:
    """Check a GOOS/GOARCH/GOARM triple against PLATFORMS; return it normalized or raise SpecError."""
    if not isinstance(os, str) or not os.strip():
        raise SpecError("os", f"os is required: choose one of {_platform_list()}")
    if not isinstance(arch, str) or not arch.strip():
        raise SpecError(
            "arch", f"arch is required: choose one of {_platform_list(os.strip().lower())}"
        )
    os_, arch_ = os.strip().lower(), arch.strip().lower()
    if (os_, arch_) in _REFUSED_PLATFORMS:
        raise SpecError("arch", f"{os_}/{arch_} is not offered: {_REFUSED_PLATFORMS[os_, arch_]}")
    if (os_, arch_) not in PLATFORMS:
        known_os = any(k[0] == os_ for k in PLATFORMS)
        raise SpecError(
            "arch" if known_os else "os",
            f"unsupported platform {_plain(os_)}/{_plain(arch_)}: choose one of "
            f"{_platform_list(os_ if known_os else None)}",
        )
    choices = PLATFORMS[os_, arch_]
    if arm is None or (isinstance(arm, str) and arm.strip() == ""):
        return os_, arch_, DEFAULT_ARM if choices else ""
    if isinstance(arm, bool) or not isinstance(arm, str | int):
        raise SpecError("arm", f'arm must be a string like "7", not {type(arm).__name__}')
    arm_ = str(arm).strip()
    if not choices:
        raise SpecError(
            "arm", f"arm={_plain(arm_)} is only for arm builds: leave arm out for {os_}/{arch_}"
        )
    if arm_ not in choices:
        raise SpecError(
            "arm", f"arm={_plain(arm_)} is not valid for {os_}/{arch_}: use {_arm_choices(choices)}"
        )
    return os_, arch_, arm_
