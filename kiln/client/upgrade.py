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
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.client.builds import (
    EXIT_FAILED,
    EXIT_OK,
    FINAL_STATES,
    ClientError,
    KilnClient,
    Progress,
    common_options,
    follow,
    handle_errors,
    human_size,
)
from kiln.client.install import BACKUP_SUFFIX, check_installed, replace_binary, verify_download
from kiln.client.installed import Installed, _refuse, inspect
from kiln.errors import SpecError
from kiln.request.spec import CADDY_MODULE, parse_plugin

LATEST = "latest"


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
