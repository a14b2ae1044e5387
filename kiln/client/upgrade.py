"""``kiln upgrade``, ``kiln add-package`` and ``kiln remove-package``: change an installed Caddy.

Caddy's own commands of these names, built by a Kiln server and checked before and after:

1. The installed binary's Go build information is read in pure Python (kiln/gomod/buildinfo.py;
   no Go needed) for its Caddy version, platform and module versions. Replaced modules
   are refused: a rebuild could not keep them.
2. As ``caddy upgrade`` does, the binary itself names its plugins: ``list-modules --packages
   --versions --skip-standard`` gives the Go module of each non-standard Caddy module. The
   packages to import are that module's packages with a ``func init`` in the binary, so a
   plugin that registers from a subpackage is kept (``caddy upgrade`` asks for the module
   root, which may register nothing).
3. Kiln builds the same set with the change: add-package and remove-package keep the
   installed Caddy version, upgrade takes the latest; plugins stay at their installed
   versions unless ``--latest-plugins`` (or ``PKG@VERSION``) says otherwise.
4. The binary is downloaded beside the installed one and, before that is touched, its
   sha256, its ed25519 signature and its provenance's subject are verified against the
   server's public key (or ``--key``).
5. It replaces the installed file atomically (fsync, rename; ``--keep-backup`` keeps the old
   one as ``FILE.bak``); the new binary's ``version`` and ``list-modules`` must show the
   Caddy version and every plugin asked for, else the old binary is put back.

``--dry-run`` prints the plan and changes nothing. Exit codes as the other client commands:
0 done (or nothing to do), 1 the build, its verification or the new binary failed (the
installed file is as it was), 2 usage or a refusal, 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts.signing import SigningKeyError
from kiln.client.builds import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    FINAL_STATES,
    ClientError,
    KilnClient,
    Progress,
    common_options,
    follow,
    handle_errors,
    host_platform,
    human_size,
)
from kiln.client.verify import (
    Report,
    VerifyError,
    check_checksum,
    check_provenance,
    check_signature,
    fetch_evidence,
    load_keys,
)
from kiln.gomod.buildinfo import BuildInfo, NotGoBinary, decode_build_info, init_packages
from kiln.request.spec import CADDY_MODULE, SpecError, parse_plugin

#: how ``caddy upgrade`` asks a binary for its plugins (Caddy v2.11.9 cmd/packagesfuncs.go)
LIST_PLUGINS = ("list-modules", "--packages", "--versions", "--skip-standard")
#: seconds ``caddy version`` or ``caddy list-modules`` may take
RUN_TIMEOUT_SECONDS = 60.0
#: the name the old binary keeps with --keep-backup
BACKUP_SUFFIX = ".bak"
LATEST = "latest"


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


@dataclass
class Entry:
    """One plugin in a plan: installed version (``""``: new) and version asked (None: removed)."""

    name: str
    packages: list[str]
    before: str = ""
    after: str | None = LATEST


@dataclass
class Plan:
    """The build that makes the change: Caddy version query and each plugin's fate."""

    installed: Installed
    caddy: str
    entries: list[Entry] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """Return the POST /api/builds body."""
        plugins = [pkg if e.after == LATEST else f"{pkg}@{e.after}"
                   for e in self.entries if e.after is not None for pkg in e.packages]
        body: dict[str, Any] = {"os": self.installed.goos, "arch": self.installed.goarch,
                                "caddy_version": self.caddy, "plugins": plugins}
        if self.installed.goarm:
            body["arm"] = self.installed.goarm
        return body


# -- reading the installed binary ----------------------------------------------------------


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


# -- planning ------------------------------------------------------------------------------


def _kept(installed: Installed, *, latest: bool = False) -> list[Entry]:
    return [Entry(p.module, list(p.packages), p.version, LATEST if latest else p.version)
            for p in installed.plugins]


def plan_upgrade(installed: Installed, *, caddy: str = "", latest_plugins: bool = False
                 ) -> Plan:
    """Plan the latest (or given) Caddy with the installed plugins."""
    return Plan(installed, caddy or LATEST, _kept(installed, latest=latest_plugins))


def _parse(arg: str) -> tuple[str, str]:
    try:
        request = parse_plugin(arg, field="package")
    except SpecError as exc:
        raise _refuse(str(exc)) from None
    return request.path, request.query


def _entry(entries: list[Entry], installed: Installed, path: str) -> Entry | None:
    plugin = installed.find(path)
    return next((e for e in entries if plugin is not None and e.name == plugin.module), None)


def plan_add(installed: Installed, args: Iterable[str], *, caddy: str = "") -> Plan:
    """Plan the installed set plus packages (``PKG@VER`` pins, else latest)."""
    entries = _kept(installed)
    for arg in args:
        path, query = _parse(arg)
        if path == CADDY_MODULE or path.startswith(CADDY_MODULE + "/"):
            raise _refuse(f"{path} is part of Caddy itself: `kiln upgrade --caddy VERSION` "
                          "changes Caddy's version")
        entry = _entry(entries, installed, path)
        if entry is None:
            entries.append(Entry(path, [path], "", query))
            continue
        named = path == entry.name or path in entry.packages
        if named and query in (LATEST, entry.before):
            how = ("`kiln upgrade --latest-plugins`, or " if query == LATEST else "")
            raise _refuse(f"{path} is already installed at {entry.before}: to change its "
                          f"version use {how}add-package {path}@VERSION")
        entry.after = query  # a version of the module moves all of its packages
        if path not in entry.packages and path != entry.name:
            entry.packages.append(path)
    return Plan(installed, caddy or installed.caddy_version, entries)


def plan_remove(installed: Installed, args: Iterable[str], *, caddy: str = "") -> Plan:
    """Plan the installed set without packages (``PKG@VER`` only if installed at VER)."""
    entries = _kept(installed)
    for arg in args:
        path, query = _parse(arg)
        entry = _entry(entries, installed, path)
        if entry is None or (path != entry.name and path not in entry.packages):
            have = ", ".join(f"{p.module} {p.version}" for p in installed.plugins)
            raise _refuse(f"{path} is not installed in {installed.path} (its plugins: "
                          f"{have or 'none'})")
        if query != LATEST and query != entry.before:
            raise _refuse(f"{path} is installed at {entry.before}, not {query}")
        if path in entry.packages and len(entry.packages) > 1:
            entry.packages.remove(path)
        else:
            entry.after = None
    return Plan(installed, caddy or installed.caddy_version, entries)


# -- showing a plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A plan with versions: Caddy before and after, and each plugin's (name, before, after)."""

    caddy_before: str
    caddy_after: str
    plugins: tuple[tuple[str, str, str], ...]

    @property
    def changes(self) -> bool:
        """Say whether anything differs from what is installed."""
        return self.caddy_before != self.caddy_after or any(b != a for _, b, a in self.plugins)

    def render(self, installed: Installed) -> str:
        """Return the plan as a user reads it."""
        arrow = (f"{self.caddy_before} → {self.caddy_after}"
                 if self.caddy_before != self.caddy_after else f"{self.caddy_before} (kept)")
        lines = [f"{installed.path}: Caddy {arrow} for {installed.platform}"]
        width = max((len(name) for name, _, _ in self.plugins), default=0)
        for name, before, after in self.plugins:
            if not before:
                lines.append(f"  added    {name:<{width}}  {after}")
            elif not after:
                lines.append(f"  removed  {name:<{width}}  {before}")
            elif before == after:
                lines.append(f"  kept     {name:<{width}}  {before}")
            else:
                lines.append(f"  changed  {name:<{width}}  {before} → {after}")
        if not self.plugins:
            lines.append("  no plugins")
        return "\n".join(lines)


def planned_outcome(plan: Plan, *, caddy: str | None = None,
                    latest: Callable[[str], tuple[str, str] | None] | None = None) -> Outcome:
    """Return a plan's outcome before building: queries, or what ``latest`` resolves them to."""
    rows = []
    for e in plan.entries:
        name, after = e.name, e.after or ""
        if after == LATEST and latest is not None:
            found = latest(e.packages[0])
            if found is not None:
                name = name if e.before else found[0]
                after = found[1]
        rows.append((name, e.before, after))
    return Outcome(plan.installed.caddy_version, caddy or plan.caddy, tuple(sorted(rows)))


def built_outcome(plan: Plan, doc: dict[str, Any]) -> Outcome:
    """Return the outcome a submitted build resolved: each plugin by Go module."""
    after: dict[str, str] = {}
    for p in doc.get("plugins") or []:
        after[str(p["module"])] = str(p["version"])
    before = {p.module: p.version for p in plan.installed.plugins}
    rows = [(m, before.get(m, ""), after.get(m, "")) for m in sorted(set(before) | set(after))]
    return Outcome(plan.installed.caddy_version, str(doc.get("caddy_version")), tuple(rows))


def _resolver(client: KilnClient) -> Callable[[str], tuple[str, str] | None]:
    def latest(path: str) -> tuple[str, str] | None:
        try:
            doc = client.request("GET", "/api/plugin-versions", params={"path": path}).json()
            return str(doc["module"]), str(doc["latest"])
        except (ClientError, KeyError, TypeError, ValueError):
            return None  # shown as "latest": the server resolves it when building

    return latest


def latest_caddy(client: KilnClient) -> str | None:
    """Return the newest Caddy the server would build, or None if it cannot say."""
    try:
        return str(client.request("GET", "/api/versions").json()["result"]["latest"])
    except (ClientError, KeyError, TypeError, ValueError):
        return None


# -- verifying and installing --------------------------------------------------------------


def verify_download(file: Path, *, server: str, build: str, key_source: str,
                    doc: dict[str, Any]) -> Report:
    """Check a downloaded build's sha256, signature, provenance and build information."""
    data = file.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    report = Report()
    try:
        keys = load_keys(key_source or server)
        evidence = fetch_evidence(server, sha256=sha256, build=build)
    except (VerifyError, SigningKeyError, ValueError, KeyError) as exc:
        raise ClientError(EXIT_FAILED, f"cannot verify build {build}: {exc}; the installed "
                          "binary was not touched (--no-verify installs it unverified)"
                          ) from None
    assert evidence.checksum is not None and evidence.signature is not None
    assert evidence.provenance is not None
    check_checksum(report, evidence.checksum, sha256, file.name)
    check_signature(report, data, evidence.signature, keys, evidence.signature_key_id)
    check_provenance(report, evidence.provenance, sha256, keys, build)
    check_build_info(report, data, doc)
    return report


def check_build_info(report: Report, data: bytes, doc: dict[str, Any]) -> None:
    """Check the binary records the platform and Caddy version the build was asked for."""
    try:
        info = decode_build_info(data)
    except NotGoBinary as exc:
        report.add(False, "build info", str(exc))
        return
    caddy = info.dep(CADDY_MODULE)
    found = (info.setting("GOOS"), info.setting("GOARCH"), caddy.version if caddy else None)
    wanted = (doc.get("os"), doc.get("arch"), doc.get("caddy_version"))
    if found != wanted:
        report.add(False, "build info", "it holds Caddy {2} for {0}/{1}, ".format(*found)
                   + "not {2} for {0}/{1}".format(*wanted))
    else:
        report.add(True, "build info", f"Caddy {found[2]} for {found[0]}/{found[1]}, "
                   f"{info.go_version}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform syncs a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _hold(target: Path, backup: Path) -> None:
    """Make ``backup`` another name of the installed file (a copy where links cannot be)."""
    staged = backup.with_name(backup.name + ".kiln-tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(target, staged)
    except OSError:
        shutil.copy2(target, staged)
        _fsync(staged)
    os.replace(staged, backup)


def replace_binary(target: Path, new: Path, *, backup: Path, keep_backup: bool,
                   check: Callable[[Path], None]) -> None:
    """Put ``new`` in place of ``target`` atomically; restore the old one if ``check`` fails."""
    st = target.stat()
    with contextlib.suppress(OSError):  # the owner stays where this user may set it
        os.chown(new, st.st_uid, st.st_gid)
    os.chmod(new, stat.S_IMODE(st.st_mode))
    _fsync(new)
    _hold(target, backup)
    try:
        os.replace(new, target)
        _fsync_dir(target.parent)
        check(target)
    except BaseException:
        os.replace(backup, target)
        _fsync_dir(target.parent)
        raise
    if not keep_backup:
        backup.unlink()
        _fsync_dir(target.parent)


def check_installed(path: Path, doc: dict[str, Any], out: Callable[[str], None]) -> None:
    """Run the new binary's ``version`` and ``list-modules``; raise unless all asked is there."""
    version = run_caddy(path, "version").strip()
    out(f"version: {version}")
    if version.split(" ", 1)[0] != doc.get("caddy_version"):
        raise ClientError(EXIT_FAILED, f"the new binary says it is Caddy {version!r}, not "
                          f"{doc.get('caddy_version')}")
    text = run_caddy(path, *LIST_PLUGINS)
    listed = parse_list_modules(text)
    for item in listed:
        out(f"  {item.module_id} {item.version} {item.path}".rstrip())
    versions = {item.path: item.version for item in listed}
    for p in doc.get("plugins") or []:
        module, version = p["module"], p["version"]
        if module not in versions:
            raise ClientError(EXIT_FAILED, f"the new binary has no Caddy module from "
                              f"{module}: {p['package']} registers none (is the plugin in "
                              "a subpackage? name that package)")
        if versions[module] != version:
            raise ClientError(EXIT_FAILED, f"the new binary lists {module} at "
                              f"{versions[module]}, not {version}")


# -- the commands --------------------------------------------------------------------------


def _target(path: str) -> Path:
    if not path:
        found = shutil.which("caddy")
        if not found:
            raise _refuse("no caddy on PATH: give the path of the binary to change")
        path = found
    target = Path(os.path.realpath(path))  # as caddy does: replace what a symlink points to
    if not target.is_file():
        raise _refuse(f"{path} is not a file")
    return target


def _writable(target: Path) -> None:
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise _refuse(f"cannot write in {target.parent}: run as a user who may replace "
                      f"{target}")


def execute(plan: Plan, args: argparse.Namespace) -> int:
    """Show the plan; unless --dry-run, build it, verify it, install it and check it."""
    client = KilnClient(args.server, api_key=args.api_key)
    installed = plan.installed
    if args.dry_run:
        caddy = latest_caddy(client) if plan.caddy == LATEST else None
        print(planned_outcome(plan, caddy=caddy, latest=_resolver(client)).render(installed))
        print("dry run: nothing was built or changed")
        return EXIT_OK
    _writable(installed.path)
    if plan.caddy == LATEST and all(e.after == e.before for e in plan.entries):
        newest = latest_caddy(client)
        if newest == installed.caddy_version:
            print(planned_outcome(plan, caddy=newest).render(installed))
            print(f"Caddy {newest} is the latest: nothing to do")
            return EXIT_OK
    doc = client.submit(plan.body())
    key = doc["key"]
    outcome = built_outcome(plan, doc)
    print(outcome.render(installed), flush=True)
    if not outcome.changes:
        print("this is what is installed: nothing to do")
        return EXIT_OK
    print(f"build {key}: {client.server}/builds/{key}", flush=True)
    progress = Progress(sys.stderr)
    if doc["state"] not in FINAL_STATES:
        doc = follow(client, key, progress)
    if doc.get("state") != "succeeded":
        progress.finish(f"kiln: build {key} {doc.get('state')}:\n"
                        f"{doc.get('error') or '(no error message)'}")
        print(f"{installed.path} was not changed", file=sys.stderr)
        return EXIT_FAILED
    artifact = doc["artifact"]
    progress.finish(f"built {artifact['filename']} ({human_size(artifact.get('size'))})")
    target = installed.path
    new = target.with_name(f".{target.name}.kiln-new")
    backup = target.with_name(target.name + BACKUP_SUFFIX) if args.keep_backup \
        else target.with_name(f".{target.name}.kiln-old")
    try:
        client.download(key, new, sha256=artifact["sha256"])
        if args.no_verify:
            print("not verified (--no-verify): only the sha256 was checked")
        else:
            report = verify_download(new, server=client.server, build=key,
                                     key_source=args.key, doc=doc)
            print(report.render(), flush=True)
            if not report.ok:
                raise ClientError(EXIT_FAILED, f"build {key} did not verify: {target} was "
                                  "not changed")
        try:
            replace_binary(target, new, backup=backup, keep_backup=args.keep_backup,
                           check=lambda path: check_installed(path, doc, print))
        except ClientError as exc:
            raise ClientError(exc.code, f"{exc.message}\nrestored the old {target}") from None
        except OSError as exc:
            raise ClientError(EXIT_FAILED, f"cannot replace {target}: {exc}; it was left "
                              "as it was") from None
    finally:
        new.unlink(missing_ok=True)
    print(f"installed {target}: Caddy {doc['caddy_version']}"
          + (f" (the old binary is {backup})" if args.keep_backup else ""))
    print("restart any running Caddy to use it")
    return EXIT_OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Rebuild the installed Caddy at the latest version, keeping its plugins."""
    installed = inspect(_target(args.path))
    return execute(plan_upgrade(installed, caddy=args.caddy,
                                latest_plugins=args.latest_plugins), args)


def cmd_add_package(args: argparse.Namespace) -> int:
    """Rebuild the installed Caddy with more plugins."""
    installed = inspect(_target(args.binary))
    return execute(plan_add(installed, args.packages, caddy=args.caddy), args)


def cmd_remove_package(args: argparse.Namespace) -> int:
    """Rebuild the installed Caddy without some plugins."""
    installed = inspect(_target(args.binary))
    return execute(plan_remove(installed, args.packages, caddy=args.caddy), args)


def _options(p: argparse.ArgumentParser, *, caddy_default: str) -> None:
    common_options(p)
    p.add_argument("--caddy", default="", metavar="VERSION",
                   help=f"the Caddy version to build (default: {caddy_default})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan; build and change nothing")
    p.add_argument("--keep-backup", action="store_true",
                   help=f"keep the old binary as FILE{BACKUP_SUFFIX}")
    p.add_argument("--key", default=os.environ.get("KILN_VERIFY_KEY", ""), metavar="KEY_OR_URL",
                   help="the public key the build must be signed with: PEM or base64 file or "
                        "text, or a Kiln URL (default: $KILN_VERIFY_KEY, else the server's)")
    p.add_argument("--no-verify", action="store_true",
                   help="install without checking the signature and provenance (only the "
                        "sha256)")


def add_commands(sub: Any) -> None:
    """Add ``upgrade``, ``add-package`` and ``remove-package`` to the kiln subparsers."""
    epilog = ("Exit: 0 done, 1 the build, its verification or the new binary failed (the "
              "installed file is unchanged), 2 usage or refused, 3 server unreachable.")
    p = sub.add_parser("upgrade", help="rebuild an installed Caddy at the latest version",
                       description="Rebuild the installed Caddy at the latest version with "
                       "the same plugins, verify it and replace the binary.", epilog=epilog)
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="the caddy binary (default: caddy on PATH)")
    p.add_argument("--latest-plugins", action="store_true",
                   help="also move every plugin to its latest version (default: keep them)")
    _options(p, caddy_default="latest")
    p.set_defaults(func=handle_errors(cmd_upgrade))
    for name, handler, verb in (("add-package", cmd_add_package, "with"),
                                ("remove-package", cmd_remove_package, "without")):
        p = sub.add_parser(name, help=f"rebuild an installed Caddy {verb} plugins",
                           description=f"Rebuild the installed Caddy {verb} the packages "
                           "given (PKG@VERSION: that version), at its Caddy version, verify "
                           "it and replace the binary.", epilog=epilog)
        p.add_argument("packages", nargs="+", metavar="PKG[@VERSION]")
        p.add_argument("-b", "--binary", default="", metavar="PATH",
                       help="the caddy binary (default: caddy on PATH)")
        _options(p, caddy_default="the installed one")
        p.set_defaults(func=handle_errors(handler))

