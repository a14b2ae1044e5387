"""Verify a downloaded build and put it in place of the installed binary."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.artifacts.signing import SigningKeyError
from kiln.client.builds import EXIT_FAILED, ClientError
from kiln.client.installed import LIST_PLUGINS, parse_list_modules, run_caddy
from kiln.client.verify import (
    Report,
    VerifyError,
    check_checksum,
    check_provenance,
    check_signature,
    fetch_evidence,
    load_keys,
)
from kiln.gomod.buildinfo import NotGoBinary, decode_build_info
from kiln.request.spec import CADDY_MODULE

#: the name the old binary keeps with --keep-backup
BACKUP_SUFFIX = ".bak"


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
