"""A worker's Go caches kept within build.cache_max_bytes: what goes, in what order.

The caches are real files laid out as go and the fleet build cache lay them out (module
trees read-only, as go leaves them); each trim is asked to shed just over one piece, so
the test sees which piece is the least recently used.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

from kiln.buildcache.cache import FRESHEN_SECONDS, BuildCache
from kiln.worker.trim import FLEET_BUILD, GO_BUILD, MODULES, CacheTrimmer, Unit, disk_usage, select

HOUR = 3600.0
NOW = time.time()


def unit(name: str, size: int, used: float) -> Unit:
    return Unit(MODULES, name, size, used, ())


def names(units: list[Unit]) -> list[str]:
    return [u.name for u in units]


# choosing ---------------------------------------------------------------------------------


def test_the_least_recently_used_go_first_until_the_rest_fits() -> None:
    units = [unit("new", 30, 300.0), unit("old", 10, 100.0), unit("mid", 20, 200.0)]

    # 100 bytes, 40 of them not in any unit: 60 over the limit of 40... all units go
    assert names(select(units, total=100, limit=40)) == ["old", "mid", "new"]
    assert names(select(units, total=100, limit=75)) == ["old", "mid"]  # 70 left
    assert names(select(units, total=100, limit=90)) == ["old"]
    assert select(units, total=100, limit=100) == []
    assert select(units, total=100, limit=500) == []


def test_pieces_used_at_the_same_time_go_in_a_stable_order() -> None:
    units = [unit("b", 10, 100.0), unit("a", 10, 100.0)]

    assert names(select(units, total=20, limit=15)) == ["a"]


# the module cache -------------------------------------------------------------------------


def write(path: Path, data: bytes = b"x", *, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))
    return path


def module(root: Path, path: str, version: str, *, age: float, tree: bool = True) -> None:
    """Lay out a module version as go leaves it: download files, and its read-only tree."""
    download = root / "cache" / "download" / path / "@v"
    for suffix in (".info", ".mod", ".lock") + ((".zip", ".ziphash") if tree else ()):
        write(download / f"{version}{suffix}", b"module " + path.encode(), age=age)
    write(download / "list", f"{version}\n".encode())
    if tree:
        top = root / f"{path}@{version}"
        write(top / "go.mod", b"module " + path.encode())
        write(top / "sub" / "code.go", b"package sub\n" * 2000)
        for dirpath, _dirs, files in os.walk(top, topdown=False):
            for name in files:
                os.chmod(Path(dirpath, name), 0o444)
            os.chmod(dirpath, 0o555)


def module_cache(root: Path) -> None:
    module(root, "example.com/old", "v1.0.0", age=10 * HOUR)
    module(root, "example.com/new", "v1.2.0", age=1 * HOUR)
    # only its go.mod was needed (go.sum's /go.mod line): no tree
    module(root, "example.com/graph", "v0.3.0", age=5 * HOUR, tree=False)
    # a version whose own name has a dot suffix like a download file's
    module(root, "example.com/!capital", "v1.0.0-rc.mod", age=2 * HOUR)
    # what is not a module version, however old
    write(root / "cache" / "download" / "sumdb" / "sum.golang.org" / "latest", age=99 * HOUR)
    write(root / "cache" / "lock", age=99 * HOUR)
    write(root / ".kiln-staging" / "abc" / "example.com" / "x@v1.0.0" / "go.mod", age=99 * HOUR)


def present(root: Path) -> set[str]:
    return {u.name for u in CacheTrimmer(limit=0, modules=root).units()}


def test_a_module_version_goes_whole_ziphash_first_and_nothing_else_goes(tmp_path: Path) -> None:
    root = tmp_path / "mod"
    module_cache(root)
    trimmer = CacheTrimmer(limit=0, modules=root)
    assert present(root) == {"example.com/old@v1.0.0", "example.com/new@v1.2.0",
                             "example.com/graph@v0.3.0", "example.com/!capital@v1.0.0-rc.mod"}
    [old] = [u for u in trimmer.units() if u.name == "example.com/old@v1.0.0"]
    assert old.paths[0].name == "v1.0.0.ziphash"  # go's mark of a complete module goes first
    assert old.paths[1] == root / "example.com" / "old@v1.0.0"

    trimmer.limit = trimmer.measure() - 1
    done = trimmer.trim()

    assert done.removed == {MODULES: 1} and done.freed[MODULES] == old.size
    assert done.after == trimmer.measure() <= trimmer.limit
    assert not (root / "example.com" / "old@v1.0.0").exists()  # read-only, and gone
    assert sorted(p.name for p in (root / "cache/download/example.com/old/@v").iterdir()) == [
        "list"]
    assert present(root) == {"example.com/new@v1.2.0", "example.com/graph@v0.3.0",
                             "example.com/!capital@v1.0.0-rc.mod"}
    assert (root / "cache/download/sumdb/sum.golang.org/latest").exists()
    assert (root / "cache/lock").exists()
    assert (root / ".kiln-staging/abc/example.com/x@v1.0.0/go.mod").exists()

    # next the go.mod-only version (5 hours), then the one named like a .mod file (2 hours)
    trimmer.limit = trimmer.measure() - 1
    trimmer.trim()
    assert "example.com/graph@v0.3.0" not in present(root)
    trimmer.limit = trimmer.measure() - 1
    trimmer.trim()
    assert present(root) == {"example.com/new@v1.2.0"}

    # nothing left but the newest module and what is never trimmed
    trimmer.limit = 0
    assert trimmer.trim().removed == {MODULES: 1}
    assert present(root) == set()
    assert (root / "cache/download/sumdb/sum.golang.org/latest").exists()


def test_modules_a_build_compiled_with_are_the_last_to_go(tmp_path: Path) -> None:
    root = tmp_path / "mod"
    module_cache(root)
    trimmer = CacheTrimmer(limit=0, modules=root)
    # a build's go.sum names the oldest module (and a line for a module not in this cache)
    trimmer.used("example.com/old v1.0.0 h1:abc=\nexample.com/old v1.0.0/go.mod h1:def=\n"
                 "example.com/elsewhere v1.0.0/go.mod h1:ghi=\n")

    trimmer.limit = trimmer.measure() - 1
    trimmer.trim()

    assert present(root) == {"example.com/old@v1.0.0", "example.com/new@v1.2.0",
                             "example.com/!capital@v1.0.0-rc.mod"}


def test_a_tree_without_download_files_is_a_module_version_too(tmp_path: Path) -> None:
    root = tmp_path / "mod"
    module_cache(root)
    for file in (root / "cache/download/example.com/new/@v").iterdir():
        file.unlink()
    write(root / "example.com" / "left@v0.1.0.tmp-1234" / "go.mod", age=99 * HOUR)  # go's own

    assert "example.com/new@v1.2.0" in present(root)
    assert not any("left" in name for name in present(root))


# Go's build cache -------------------------------------------------------------------------


def test_go_build_cache_files_go_by_their_mtime_and_go_s_own_files_stay(tmp_path: Path) -> None:
    gocache = tmp_path / "build"
    old = write(gocache / "ab" / ("ab" + "1" * 62 + "-d"), b"o" * 9000, age=48 * HOUR)
    entry = write(gocache / "ab" / ("ab" + "2" * 62 + "-a"), b"e", age=2 * HOUR)
    new = write(gocache / "cd" / ("cd" + "3" * 62 + "-d"), b"n" * 9000, age=0)
    for name in ("README", "trim.txt", "testexpire.txt"):
        write(gocache / name, age=99 * HOUR)
    write(gocache / "fuzz" / "ab" / ("ab" + "4" * 62 + "-d"), age=99 * HOUR)
    trimmer = CacheTrimmer(limit=0, modules=tmp_path / "mod", gocache=gocache)
    assert sorted(u.cache for u in trimmer.units()) == [GO_BUILD] * 3

    trimmer.limit = trimmer.measure() - 1
    assert trimmer.trim().removed == {GO_BUILD: 1}
    assert not old.exists() and entry.exists() and new.exists()

    trimmer.limit = 0
    trimmer.trim()
    assert not entry.exists() and not new.exists()
    assert sorted(p.name for p in gocache.iterdir()) == [
        "README", "ab", "cd", "fuzz", "testexpire.txt", "trim.txt"]
    assert len(list((gocache / "fuzz" / "ab").iterdir())) == 1


# the fleet build cache's local directory -----------------------------------------------


def put(cache: BuildCache, action: str, data: bytes, *, age: float) -> str:
    output = hashlib.sha256(data).hexdigest()
    cache.put(action, output, len(data), io.BytesIO(data))
    for path in (cache.actions / action, cache.outputs / output):
        os.utime(path, (NOW - age, NOW - age))
    return output


def build_cache(tmp_path: Path) -> BuildCache:
    return BuildCache(directory=tmp_path / "buildcache", store=None,
                      program=tmp_path / "cacheprog", socket_dir=tmp_path / "sock")


def test_an_output_goes_with_the_entries_naming_it_once_none_is_recent(tmp_path: Path) -> None:
    cache = build_cache(tmp_path)
    lone = put(cache, "a" * 64, b"lone" * 3000, age=10 * HOUR)
    shared = put(cache, "b" * 64, b"shared" * 3000, age=20 * HOUR)
    assert put(cache, "c" * 64, b"shared" * 3000, age=1 * HOUR) == shared  # a newer entry
    trimmer = CacheTrimmer(limit=0, modules=tmp_path / "mod", buildcache=cache)
    assert {u.name: len(u.paths) for u in trimmer.units()} == {lone: 2, shared: 3}

    trimmer.limit = trimmer.measure() - 1
    assert trimmer.trim().removed == {FLEET_BUILD: 1}

    assert not (cache.actions / ("a" * 64)).exists() and not (cache.outputs / lone).exists()
    assert cache.get("a" * 64) is None
    assert cache.get("b" * 64) is not None and cache.get("c" * 64) is not None


def test_a_local_hit_marks_its_entry_and_output_used_at_most_hourly(tmp_path: Path) -> None:
    cache = build_cache(tmp_path)
    output = put(cache, "a" * 64, b"data", age=2 * HOUR)
    files = (cache.actions / ("a" * 64), cache.outputs / output)

    assert cache.get("a" * 64) is not None
    assert all(NOW - f.stat().st_mtime < 60 for f in files)

    recent = int((NOW - FRESHEN_SECONDS / 2) * 1e9)
    for f in files:
        os.utime(f, ns=(recent, recent))
    assert cache.get("a" * 64) is not None
    assert all(f.stat().st_mtime_ns == recent for f in files)  # not a write for each hit


def test_disk_usage_counts_what_du_counts(tmp_path: Path) -> None:
    write(tmp_path / "d" / "f", b"x" * 10000)
    expected = sum(os.lstat(p).st_blocks * 512 for p in (
        tmp_path / "d", tmp_path / "d" / "f"))
    assert disk_usage(tmp_path / "d") == expected
    assert disk_usage(tmp_path / "missing") == 0
