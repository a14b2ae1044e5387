"""Module sets: what a build's fetch phase left in the module cache, shared with the fleet.

The fetch phase (kiln/worker/builder.py) turns a spec into go.mod and go.sum with go get
and go mod tidy; afterwards the module cache holds every module go.sum names. Once a build
succeeded its worker stores that set under ``modcache/sets/`` in the store:

* ``<key>.json``: go.mod and go.sum, as the fetch wrote them;
* ``<key>.tar``: the module cache files go.sum names: each module's extracted tree and its
  ``.mod``, ``.info`` and ``.ziphash`` files (not the zips: builds never read them).

Both carry the store's size and SHA-256 sidecar (kiln/modproxy/store.py). The key is a
digest of what decides go.mod and go.sum: the Go version (``go mod init`` writes its go
line), Caddy's version, the plugins' modules, versions and packages, the replacements.

A worker asked for a spec whose set the fleet knows skips the fetch steps: it writes go.mod
and go.sum from the record and extracts from the tar only the modules its own cache lacks
(none, on a worker that built the spec before). The tar is checked as it is read and its
modules moved into the module cache only once the whole matched its sidecar; a module's
tree goes in before its ``.ziphash``, which go takes as the mark of a complete module, so a
worker killed half way leaves nothing go would use. The compile step then checks every
module against go.sum as it always does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from kiln.modproxy.store import CacheUnavailable, Corrupt, ModuleStore

log = logging.getLogger(__name__)

#: where the sets are, under the store's modcache/
SETS = "sets/"
#: the counter of what became of each look-up and publication
SETS_METRIC = "kiln_modcache_sets_total"
#: the staging directory in the module cache (same file system: its trees are renamed)
STAGING = ".kiln-staging"
#: seconds the tar program may take to unpack a set
UNTAR_TIMEOUT_SECONDS = 600
#: the files of a module's download directory a set carries; .ziphash last when moved
_FULL = (".mod", ".info", ".ziphash")
_GO_MOD_ONLY = (".mod", ".info")
_REQUIRED = {".mod", ".ziphash"}


class Counters(Protocol):
    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None: ...


def escape(text: str) -> str:
    """Return a module path or version as the module cache spells it (``!`` + lower case)."""
    return re.sub(r"[A-Z]", lambda m: "!" + m.group(0).lower(), text)


@dataclass(frozen=True)
class Module:
    """A module version go.sum names; ``full`` when its tree (not only go.mod) is named."""

    path: str
    version: str
    full: bool

    @property
    def tree(self) -> str:
        """The extracted tree's directory, relative to the module cache."""
        return f"{escape(self.path)}@{escape(self.version)}"

    def download(self, suffix: str) -> str:
        """A file of its download directory, relative to the module cache."""
        return f"cache/download/{escape(self.path)}/@v/{escape(self.version)}{suffix}"

    @property
    def suffixes(self) -> tuple[str, ...]:
        return _FULL if self.full else _GO_MOD_ONLY


def modules_of(go_sum: str) -> list[Module]:
    """Return the module versions ``go_sum`` names, each once (its tree if any line wants it)."""
    found: dict[tuple[str, str], bool] = {}
    for line in go_sum.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        path, version = fields[0], fields[1]
        full = not version.endswith("/go.mod")
        version = version.removesuffix("/go.mod")
        if ".." in path or path.startswith("/") or "@" in path + version:
            raise ValueError(f"go.sum names an impossible module: {path} {version}")
        found[(path, version)] = found.get((path, version), False) or full
    return [Module(p, v, full) for (p, v), full in sorted(found.items())]


def set_key(*, go_version: str, caddy_version: str,
            plugins: Sequence[tuple[str, str, str]],
            replacements: Sequence[tuple[str, str, str, str]]) -> str:
    """Return the key of the module set these inputs give (they decide go.mod and go.sum)."""
    what = {"go": go_version, "caddy": caddy_version, "plugins": [list(p) for p in plugins],
            "replacements": [list(r) for r in replacements]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Record:
    """A set's record: go.mod, go.sum, and the download files its tar holds."""

    go_mod: str
    go_sum: str
    files: frozenset[str]


@dataclass(frozen=True)
class Restored:
    """A set a worker used: its go.mod and go.sum, and how many modules came from the tar."""

    go_mod: str
    go_sum: str
    modules: int
    extracted: int


class ModuleSets:
    """The fleet's module sets, as one worker with one module cache uses them."""

    def __init__(self, store: ModuleStore, *, modcache: Path,
                 adopt: Callable[[Path], None] = lambda path: None,
                 counters: Counters | None = None) -> None:
        self.store = store
        self.modcache = modcache.resolve()
        #: hands a directory or file the worker created to the sandbox user (the docker
        #: sandbox's steps write the module cache as that user)
        self.adopt = adopt
        self.counters = counters
        staging = self.modcache / STAGING
        if staging.exists():  # a predecessor killed while it extracted
            _remove(staging)

    def _count(self, result: str) -> None:
        if self.counters is not None:
            self.counters.inc(SETS_METRIC, {"result": result})

    # -- restore ----------------------------------------------------------------------

    def restore(self, key: str) -> Restored | None:
        """Return the set ``key`` with all its modules in the module cache, or None.

        None when the fleet has no such set, the store cannot be read, or the set is bad
        (a corrupt one is deleted): the caller then fetches as usual.
        """
        try:
            record = self._record(key)
            if record is None:
                self._count("miss")
                return None
            modules = modules_of(record.go_sum)
            missing = [m for m in modules if not self._complete(m)]
            if any((self.modcache / m.tree).exists() for m in missing if m.full):
                # go's own half-extracted download (.partial) or one without .ziphash: go
                # repairs those when it fetches, so this build fetches
                self._count("miss")
                return None
            if missing and not self._extract(key, missing, record.files, modules):
                return None
        except Corrupt as exc:
            log.warning("module set %s: %s", key, exc)
            self._count("corrupt")
            return None
        except (CacheUnavailable, OSError, ValueError, subprocess.SubprocessError) as exc:
            log.warning("module set %s unusable, fetching instead: %s", key, exc)
            self._count("error")
            return None
        self._count("restored" if missing else "local")
        return Restored(go_mod=record.go_mod, go_sum=record.go_sum, modules=len(modules),
                        extracted=len(missing))

    def _record(self, key: str) -> Record | None:
        data = self.store.get(f"{SETS}{key}.json")
        if data is None:
            return None
        with data:
            try:
                raw = json.loads(data.read())
                record = Record(go_mod=raw["go_mod"], go_sum=raw["go_sum"],
                                files=frozenset(raw["files"]))
            except (ValueError, KeyError, TypeError):
                return None
        if not (isinstance(record.go_mod, str) and isinstance(record.go_sum, str)
                and all(isinstance(f, str) for f in record.files)):
            return None
        return record

    def _complete(self, m: Module) -> bool:
        if not (self.modcache / m.download(".mod")).is_file():
            return False
        if not m.full:
            return True
        return ((self.modcache / m.tree).is_dir()
                and (self.modcache / m.download(".ziphash")).is_file()
                and not (self.modcache / m.download(".partial")).exists())

    def _extract(self, key: str, missing: list[Module], files: frozenset[str],
                 modules: list[Module]) -> bool:
        stream = self.store.open(f"{SETS}{key}.tar")
        if stream is None:
            self._count("miss")
            return False
        names = [m.tree for m in missing if m.full]
        names += [m.download(s) for m in missing for s in m.suffixes
                  if m.download(s) in files]
        staging = self.modcache / STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            with contextlib.closing(stream):
                # checked whole before a byte of it is unpacked
                stream.finish()  # raises Corrupt
                # the tar program matches each member against a list of names one by one:
                # slower than unpacking all when most of the set is missing
                _untar(stream.raw, staging, names if len(missing) * 2 < len(modules) else [])
            for m in missing:
                for name in ([m.tree] if m.full else []) + [
                        m.download(s) for s in m.suffixes if s in _REQUIRED]:
                    if not (staging / name).exists():
                        raise ValueError(f"the set's tar lacks {name}")
            self._move_in(staging, missing)
        finally:
            _remove(staging)
        return True

    def _move_in(self, staging: Path, missing: list[Module]) -> None:
        """Move the staged modules into the module cache, each under go's own lock."""
        created: list[Path] = []
        try:
            for m in missing:
                lock = self.modcache / m.download(".lock")
                created += _make_parents(lock.parent, self.modcache)
                fresh = not lock.exists()
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                if fresh:
                    created.append(lock)
                try:
                    # the lock go takes to download and unpack this version: a fetch step
                    # doing the same waits, then finds the module complete
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    self._move_module(staging, m, created)
                finally:
                    os.close(fd)
        finally:
            # the steps' user writes other versions beside these (the trees themselves
            # are read-only to everyone, go's way)
            for path in created:
                self.adopt(path)

    def _move_module(self, staging: Path, m: Module, created: list[Path]) -> None:
        if self._complete(m):
            return  # another build, or go, put it there meanwhile
        if m.full:
            tree = self.modcache / m.tree
            if tree.exists():
                raise OSError(f"{m.tree} is in the module cache without its .ziphash")
            created += _make_parents(tree.parent, self.modcache)
            # renaming a directory needs it writable; go keeps module trees read-only
            source = staging / m.tree
            mode = stat.S_IMODE(source.stat().st_mode)
            os.chmod(source, mode | stat.S_IWUSR)
            os.rename(source, tree)
            os.chmod(tree, mode)
        # .ziphash last: go takes a module whose .ziphash is there for a complete one
        for suffix in m.suffixes:
            source, target = staging / m.download(suffix), self.modcache / m.download(suffix)
            if source.exists():
                os.replace(source, target)
                created.append(target)

    # -- publish ----------------------------------------------------------------------

    def publish(self, key: str, *, go_mod: str, go_sum: str) -> bool:
        """Store the set a build's fetch left in the module cache; tell whether it was stored.

        Not stored when the fleet has it already or a module go.sum names is not complete
        in the module cache (another build on this worker may be changing it). A record
        whose tar was collected is stored again, with a new tar.
        """
        try:
            if self.store.has(f"{SETS}{key}.json") and self.store.has(f"{SETS}{key}.tar"):
                return False
            modules = modules_of(go_sum)
            if not all(self._complete(m) for m in modules):
                log.info("module set %s not shared: the module cache lacks part of it", key)
                return False
            with tempfile.TemporaryFile(dir=self.modcache.parent) as tar:
                files = _tar(tar, self.modcache, modules)
                self.store.put(f"{SETS}{key}.tar", tar)
            # after the tar: a record always names a stored tar
            record = json.dumps({"go_mod": go_mod, "go_sum": go_sum,
                                 "files": files}).encode()
            with tempfile.TemporaryFile() as body:
                body.write(record)
                body.seek(0)
                self.store.put(f"{SETS}{key}.json", body)
        except (CacheUnavailable, OSError, ValueError) as exc:
            log.warning("module set %s not shared: %s", key, exc)
            self._count("error")
            return False
        self._count("published")
        log.info("module set %s shared: %d modules", key, len(modules))
        return True


def _tar(into: IO[bytes], root: Path, modules: list[Module]) -> list[str]:
    """Write the modules' trees and download files to ``into``; return the files written."""
    files: list[str] = []

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isfile() or info.isdir()):
            return None  # go's module trees hold neither links nor devices
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=into, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in modules:
            for suffix in m.suffixes:
                name = m.download(suffix)
                if (root / name).is_file():
                    tar.add(root / name, arcname=name, filter=plain)
                    files.append(name)
            if m.full:
                tar.add(root / m.tree, arcname=m.tree, filter=plain)
    into.seek(0)
    return files


def _untar(source: IO[bytes], into: Path, names: list[str]) -> None:
    """Extract ``names`` (trees with all they hold, and files; all when empty) from a
    checked tar.

    The tar program does it: file creation is what takes the time, and it creates files
    several times faster than Python's tarfile. It refuses names leaving ``into``.
    """
    program = shutil.which("tar")
    if program is None:
        raise ValueError("no tar program on this worker's PATH")
    source.seek(0)
    with tempfile.NamedTemporaryFile("w", suffix=".names") as listing:
        listing.write("".join(name + "\n" for name in names))
        listing.flush()
        done = subprocess.run(
            [program, "-x", "-f", "-", "-C", str(into), "--no-same-owner",
             *(["-T", listing.name] if names else [])],
            stdin=source, capture_output=True, timeout=UNTAR_TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        raise ValueError(f"tar: {done.stderr.decode(errors='replace').strip()[-500:]}")


def _make_parents(directory: Path, root: Path) -> list[Path]:
    """Create ``directory`` and its missing parents below ``root``; return those created."""
    missing: list[Path] = []
    while directory != root and not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
    return list(reversed(missing))


def _remove(path: Path) -> None:
    """Remove a tree whose directories go made read-only."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR | stat.S_IXUSR)
    shutil.rmtree(path, ignore_errors=True)
