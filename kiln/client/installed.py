"""What an installed Caddy binary holds, read for upgrade/add-package/remove-package."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kiln.client.builds import EXIT_FAILED, EXIT_USAGE, ClientError, host_platform
from kiln.gomod.buildinfo import BuildInfo, NotGoBinary, decode_build_info, init_packages
from kiln.request.spec import CADDY_MODULE

#: how ``caddy upgrade`` asks a binary for its plugins (Caddy v2.11.9 cmd/packagesfuncs.go)
LIST_PLUGINS = ("list-modules", "--packages", "--versions", "--skip-standard")
#: seconds ``caddy version`` or ``caddy list-modules`` may take
RUN_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Listed:
    """One line of ``caddy list-modules --packages --versions``."""

    module_id: str
    version: str = ""
    path: str = ""
    replaced: bool = False
    #: why Caddy could not load the module (its "unknown modules")
    error: str = ""


@dataclass(frozen=True)
class Plugin:
    """A plugin built into a binary: its Go module, version and the packages imported."""

    module: str
    version: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Installed:
    """What an installed Caddy binary holds."""

    path: Path
    info: BuildInfo
    caddy_version: str
    goos: str
    goarch: str
    goarm: str
    plugins: tuple[Plugin, ...]

    @property
    def platform(self) -> str:
        """Return GOOS/GOARCH (and GOARM) as Kiln writes them."""
        return f"{self.goos}/{self.goarch}" + (f"/v{self.goarm}" if self.goarm else "")

    def find(self, path: str) -> Plugin | None:
        """Return the plugin whose module is ``path`` or holds the package ``path``."""
        return next((p for p in self.plugins
                     if path == p.module or path.startswith(p.module + "/")), None)


def parse_list_modules(text: str) -> list[Listed]:
    """Parse ``list-modules`` output: ``ID [VERSION] [GO-MODULE [=> REPLACEMENT]] [[error]]``."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(" "):  # blank, or "  Standard modules: N"
            continue
        text, _, error = line.partition(" [")
        fields = text.split()
        replaced = "=>" in fields
        if replaced:
            fields = fields[: fields.index("=>")]
        fields += ["", ""]
        out.append(Listed(fields[0], fields[1], fields[2], replaced=replaced,
                          error=error.removesuffix("]")))
    return out


def run_caddy(path: Path, *args: str, platform: str = "") -> str:
    """Run the binary with ``args``; return its standard output or raise ClientError."""
    try:
        result = subprocess.run([str(path), *args], capture_output=True, text=True,
                                timeout=RUN_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise ClientError(EXIT_USAGE, f"cannot run {path}: {exc.strerror or exc}") from None
        here = "/".join(filter(None, host_platform()))
        built = f" is Caddy for {platform} and" if platform else ""
        raise ClientError(EXIT_USAGE, f"{path}{built} cannot run on this machine ({here}): "
                          f"{exc.strerror or exc}; run kiln where that binary runs") from None
    except subprocess.TimeoutExpired:
        raise ClientError(EXIT_FAILED, f"`{path.name} {' '.join(args)}` did not finish in "
                          f"{RUN_TIMEOUT_SECONDS:.0f} s") from None
    if result.returncode != 0:
        raise ClientError(EXIT_FAILED, f"`{path.name} {' '.join(args)}` exited with "
                          f"{result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout


def _refuse(message: str) -> ClientError:
    return ClientError(EXIT_USAGE, message)


def inspect(path: Path) -> Installed:
    """Read what the installed binary holds; raise ClientError where Kiln cannot rebuild it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _refuse(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = decode_build_info(data)
    except NotGoBinary as exc:
        raise _refuse(f"{path} is not a Go binary Kiln can read: {exc}") from None
    caddy = info.dep(CADDY_MODULE)
    if caddy is None:
        main = info.main.path if info.main else info.path or "?"
        if main == CADDY_MODULE:
            raise _refuse(f"{path} was built inside Caddy's own source tree (version "
                          f"{info.main.version if info.main else '?'}), not by xcaddy or "
                          "Kiln: its plugins and version cannot be told apart")
        raise _refuse(f"{path} is a Go program ({main}) but not Caddy: it holds no "
                      f"{CADDY_MODULE}")
    replaced = [m for m in info.deps if m.replace is not None]
    if replaced:
        raise _refuse(f"{path} was built with replaced modules, which a rebuild cannot keep: "
                      + "; ".join(f"{m.path} {m.version} => {m.replace.path} "
                                  f"{m.replace.version}".rstrip()
                                  for m in replaced if m.replace is not None))
    goos, goarch = info.setting("GOOS") or "", info.setting("GOARCH") or ""
    if not goos or not goarch:
        raise _refuse(f"{path} does not record its GOOS and GOARCH")
    goarm = (info.setting("GOARM") or "")[:1] if goarch == "arm" else ""
    platform = f"{goos}/{goarch}" + (f"/v{goarm}" if goarm else "")
    listed = parse_list_modules(run_caddy(path, *LIST_PLUGINS, platform=platform))
    inits = init_packages(data)
    plugins: dict[str, Plugin] = {}
    for item in listed:
        if item.error:  # not loadable, so not a plugin caddy upgrade would keep either
            continue
        if item.replaced:
            raise _refuse(f"Caddy module {item.module_id} comes from {item.path}, which was "
                          "replaced when the binary was built: a rebuild cannot keep it")
        module = info.module_of(item.path) if item.path else None
        if module is None:
            raise _refuse(f"Caddy module {item.module_id} is not from a Go module the binary "
                          "depends on (built into its main package?): Kiln cannot rebuild it")
        if module.path == CADDY_MODULE or module.path in plugins:
            continue
        plugins[module.path] = Plugin(module.path, module.version,
                                      _packages_of(module.path, inits, info))
    return Installed(path=path, info=info, caddy_version=caddy.version, goos=goos,
                     goarch=goarch, goarm=goarm,
                     plugins=tuple(sorted(plugins.values(), key=lambda p: p.module)))


def _packages_of(module: str, inits: Iterable[str], info: BuildInfo) -> tuple[str, ...]:
    """Return the packages of ``module`` that run an init (its root when none is found)."""
    found = sorted(
        p for p in inits
        if (p == module or p.startswith(module + "/"))
        and "internal" not in p[len(module):].split("/")
        and (held := info.module_of(p)) is not None and held.path == module
    )
    return tuple(found) or (module,)
