"""Keep a worker's Go caches within ``build.cache_max_bytes``, trimmed while it builds nothing.

A long-lived worker's caches grow with every Caddy version and plugin it builds: Go's module
cache (the sandbox's GOMODCACHE), Go's build cache (its GOCACHE directory) and the local
directory of the fleet build cache (kiln/buildcache/cache.py). When together they take more
than the limit on disk, the idle worker (kiln/worker/loop.py) deletes what was used least
recently, one whole piece at a time, until they fit:

* a module version: its ``.ziphash`` first (go takes a tree without one for an unfinished
  extraction and fetches the module again, so a half-deleted module is never used), then
  its tree (read-only, as go leaves it), then its other download files. Its last use is
  the newest mtime of its files; the worker refreshes the ``.mod`` of each module a
  build's go.sum names once the build compiled (``used``). ``cache/download/sumdb``, the
  version lists, the module sets' staging directory and whatever is not a module version
  stay.
* a fleet build cache output with the entries naming it, the entries first (an entry then
  never names a missing output); BuildCache.get refreshes the mtimes of what it serves.
* a file of Go's build cache (``<xx>/<id>-a`` or ``-d``): go refreshes their mtimes as it
  uses them, and its own trim deletes them by age the same way; an entry whose output is
  gone is a miss to go, which compiles again.

Each mtime is refreshed once it is an hour old, as go does its own: a use costs no write,
and one order, to the hour, holds across the three caches.

Sizes are what files take on disk (allocated blocks), as du counts them; the total is all of
the three directories, the parts never deleted included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kiln.buildcache.cache import FRESHEN_SECONDS, ID, BuildCache, Entry
from kiln.modproxy.modsets import STAGING, modules_of

log = logging.getLogger(__name__)

#: the counter of what trims deleted, by cache
TRIMMED_METRIC = "kiln_worker_cache_trimmed_bytes_total"
#: the caches, as that counter labels them
MODULES, GO_BUILD, FLEET_BUILD = "modules", "gobuild", "buildcache"
#: a module version's download file: ``<version>.<kind>`` (the last dot: versions have dots)
_VERSION_FILE = re.compile(r"^(?P<version>v.+)\.(?:info|mod|zip|ziphash|lock|partial)$")
#: Go's build cache: ``<first two hex digits>/<64 hex digits>-a`` (entry) or ``-d`` (output)
_GO_CACHE_DIR = re.compile(r"^[0-9a-f]{2}$")
_GO_CACHE_FILE = re.compile(r"^[0-9a-f]{64}-[ad]$")


class Counters(Protocol):
    """Where trims are counted (kiln/metrics.py's MetricsRecorder)."""

    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None: ...


@dataclass(frozen=True)
class Unit:
    """A piece of a cache that is deleted whole."""

    cache: str
    name: str
    #: bytes on disk
    size: int
    #: last use, unix seconds
    used: float
    #: deleted in this order: the first makes the rest unused if a deletion stops half way
    paths: tuple[Path, ...]


def select(units: Iterable[Unit], *, total: int, limit: int) -> list[Unit]:
    """Return the least recently used units whose deletion brings ``total`` to ``limit``.

    All of them when even that is not enough (what is not in a unit stays).
    """
    over = total - limit
    chosen: list[Unit] = []
    for unit in sorted(units, key=lambda u: (u.used, u.cache, u.name)):
        if over <= 0:
            break
        chosen.append(unit)
        over -= unit.size
    return chosen


@dataclass
class Trimmed:
    """What one trim found and did."""

    before: int
    after: int
    #: units deleted and their bytes, by cache
    removed: Counter[str] = field(default_factory=Counter)
    freed: Counter[str] = field(default_factory=Counter)
    #: stopped before it was done: a build may be waiting
    interrupted: bool = False


class CacheTrimmer:
    """Measure a worker's Go caches and delete the least recently used past ``limit`` bytes."""

    def __init__(self, *, limit: int, modules: Path, gocache: Path | None = None,
                 buildcache: BuildCache | None = None,
                 counters: Counters | None = None) -> None:
        self.limit = limit
        #: Go's module cache (GOMODCACHE)
        self.modules = modules.resolve()
        #: Go's build cache directory (GOCACHE)
        self.gocache = gocache.resolve() if gocache is not None else None
        #: the fleet build cache, whose local directory is trimmed too
        self.buildcache = buildcache
        self.counters = counters

    def used(self, go_sum: str) -> None:
        """Mark the modules ``go_sum`` names as used now (a build just compiled with them).

        As the build caches are marked: once their mark is an hour old.
        """
        try:
            modules = modules_of(go_sum)
        except ValueError:
            return
        now = time.time()
        for module in modules:
            path = self.modules / module.download(".mod")
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > FRESHEN_SECONDS:
                    os.utime(path)

    def _directories(self) -> list[Path]:
        found = [self.modules]
        if self.gocache is not None:
            found.append(self.gocache)
        if self.buildcache is not None:
            found += [self.buildcache.actions, self.buildcache.outputs]
        return found

    def measure(self) -> int:
        """Return the bytes the caches take on disk."""
        return sum(disk_usage(d) for d in self._directories())

    def units(self) -> list[Unit]:
        """Return every piece of the caches that a trim may delete."""
        found = list(module_versions(self.modules))
        if self.gocache is not None:
            found += go_cache_files(self.gocache)
        if self.buildcache is not None:
            found += build_cache_outputs(self.buildcache.actions, self.buildcache.outputs)
        return found

    def trim(self, *, stop: Callable[[], bool] = lambda: False) -> Trimmed:
        """Delete the least recently used units until the caches fit; ``stop`` ends it early.

        Call it only while no build runs: a compile may be reading any of these files.
        """
        started = time.monotonic()
        before = self.measure()
        done = Trimmed(before, before)
        if before <= self.limit:
            log.debug("worker caches: %s, within the limit of %s", _size(before),
                      _size(self.limit))
            return done
        for unit in select(self.units(), total=before, limit=self.limit):
            if stop():
                done.interrupted = True
                break
            try:
                for path in unit.paths:
                    remove(path)
            except OSError as exc:
                log.warning("worker caches: cannot delete %s %s: %s", unit.cache, unit.name, exc)
                continue
            done.removed[unit.cache] += 1
            done.freed[unit.cache] += unit.size
        done.after = before - sum(done.freed.values())
        for cache, amount in done.freed.items():
            if self.counters is not None:
                self.counters.inc(TRIMMED_METRIC, {"cache": cache}, amount)
        if done.removed:
            log.info("worker caches trimmed from %s to %s (limit %s) in %.1fs: %d module "
                     "version(s), %d Go build cache file(s), %d fleet build cache "
                     "output(s)%s",
                     _size(before), _size(done.after), _size(self.limit),
                     time.monotonic() - started, done.removed[MODULES],
                     done.removed[GO_BUILD], done.removed[FLEET_BUILD],
                     "; stopped for a build, the rest next time" if done.interrupted else "")
        if done.after > self.limit and not done.interrupted:
            log.warning("worker caches: %s remain above build.cache_max_bytes (%s) in what is "
                        "never trimmed (checksum database, lists, directories)",
                        _size(done.after), _size(self.limit))
        return done


# measuring ------------------------------------------------------------------------------


def _disk(st: os.stat_result) -> int:
    return st.st_blocks * 512


def disk_usage(path: Path) -> int:
    """Return the bytes ``path`` and everything under it take on disk (as ``du``)."""
    try:
        total = _disk(os.lstat(path))
    except OSError:
        return 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        total += _disk(entry.stat(follow_symlinks=False))
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
    return total


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _files(directory: Path) -> Iterator[os.DirEntry[str]]:
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        yield from entries


@dataclass
class _Version:
    tree: Path | None = None
    files: list[Path] = field(default_factory=list)


def module_versions(root: Path) -> Iterator[Unit]:
    """Yield each module version in the module cache ``root``: its tree and download files."""
    found: dict[str, _Version] = {}
    for entry in _files(root):
        if entry.name in ("cache", STAGING) or entry.name.startswith("."):
            continue  # go's own files; the staging directory of module sets
        if entry.is_dir(follow_symlinks=False):
            _trees(Path(entry.path), entry.name, found)
    _downloads(root / "cache" / "download", "", found)
    for name, version in sorted(found.items()):
        ziphash = [p for p in version.files if p.name.endswith(".ziphash")]
        rest = sorted(p for p in version.files if p not in ziphash)
        paths = tuple(ziphash + ([version.tree] if version.tree is not None else []) + rest)
        used = max((_mtime(p) for p in version.files), default=0.0) or _mtime(paths[0])
        size = sum(disk_usage(p) for p in paths)
        yield Unit(MODULES, name, size, used, paths)


def _trees(directory: Path, prefix: str, found: dict[str, _Version]) -> None:
    """Find the trees ``<escaped path>@<version>`` under ``directory`` (``prefix`` its path)."""
    if "@" in directory.name:
        # a module path has no "@": the tree of prefix's module at that version, unless an
        # extraction left by a Go before 1.16 (<tree>.tmp-<n>), which go removes itself
        if ".tmp-" not in directory.name:
            found.setdefault(prefix, _Version()).tree = directory
        return
    for entry in _files(directory):
        if entry.is_dir(follow_symlinks=False):
            _trees(Path(entry.path), f"{prefix}/{entry.name}", found)


def _downloads(directory: Path, prefix: str, found: dict[str, _Version]) -> None:
    """Find the versions' files in ``cache/download/<escaped path>/@v/``."""
    for entry in _files(directory):
        if not entry.is_dir(follow_symlinks=False) or not prefix and entry.name == "sumdb":
            continue
        if entry.name == "@v":
            for file in _files(Path(entry.path)):
                match = _VERSION_FILE.match(file.name)
                if match and file.is_file(follow_symlinks=False):
                    name = f"{prefix}@{match.group('version')}"
                    found.setdefault(name, _Version()).files.append(Path(file.path))
        else:
            _downloads(Path(entry.path), f"{prefix}/{entry.name}" if prefix else entry.name,
                       found)


def go_cache_files(root: Path) -> Iterator[Unit]:
    """Yield each entry and output file of Go's build cache ``root``."""
    for sub in _files(root):
        if not _GO_CACHE_DIR.match(sub.name) or not sub.is_dir(follow_symlinks=False):
            continue
        for file in _files(Path(sub.path)):
            if not _GO_CACHE_FILE.match(file.name):
                continue
            try:
                st = file.stat(follow_symlinks=False)
            except OSError:
                continue
            yield Unit(GO_BUILD, f"{sub.name}/{file.name}", _disk(st), st.st_mtime,
                       (Path(file.path),))


def build_cache_outputs(actions: Path, outputs: Path) -> Iterator[Unit]:
    """Yield each output of the fleet build cache's local directory with the entries naming it.

    An entry that names no output there, or is not an entry, is a unit of its own.
    """
    naming: dict[str, list[Path]] = {}
    for file in _files(actions):
        if not ID.match(file.name):
            continue
        try:
            entry = Entry.decode(Path(file.path).read_bytes())
        except OSError:
            continue
        naming.setdefault(entry.output if entry is not None else f"a/{file.name}",
                          []).append(Path(file.path))
    for file in _files(outputs):  # after the entries naming it
        if ID.match(file.name):
            naming.setdefault(file.name, []).append(Path(file.path))
    for output, paths in sorted(naming.items()):
        size = sum(disk_usage(p) for p in paths)
        yield Unit(FLEET_BUILD, output, size, max(_mtime(p) for p in paths), tuple(paths))


# deleting -------------------------------------------------------------------------------


def remove(path: Path) -> None:
    """Delete a file, or a directory and all it holds even if go made it read-only."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    for dirpath, _dirs, _files in os.walk(path):  # top down: writable before it is emptied
        os.chmod(dirpath, stat.S_IMODE(os.lstat(dirpath).st_mode) | stat.S_IRWXU)
    shutil.rmtree(path)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

