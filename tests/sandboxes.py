"""Sandboxes and a module proxy for tests that drive the Builder directly.

The docker sandbox's steps run as uid 1000, so the ``file://`` proxy they mount must be
world-readable, as it is in production; ``readable_proxy`` writes one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import Sandbox
from kiln.worker.sandbox.process import ProcessSandbox, find_go
from tests.fixtures import goproxy as gp

#: generous step timeouts: these tests are about bytes, not about limits
FETCH_TIMEOUT_SECONDS = 300.0
COMPILE_TIMEOUT_SECONDS = 900.0


def readable_proxy(root: Path) -> Path:
    """Write the synthetic module proxy at ``root``, readable by every user; return it."""
    gp.generate(root)
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(Path(dirpath, name), 0o644)
    return root


def process_sandbox(cache_dir: Path) -> ProcessSandbox:
    """Return a process sandbox with its Go caches under ``cache_dir``."""
    return ProcessSandbox(go=find_go(), cache_dir=cache_dir)


def docker_sandbox(client: Any, image: str, cache_dir: Path, proxy: Path, *,
                   worker_id: str, **overrides: Any) -> Sandbox:
    """Return a docker sandbox as a worker configures it, fetching from a file:// proxy."""
    from kiln.worker.sandbox.docker import DockerSandbox

    settings: dict[str, Any] = {
        "client": client, "image": image, "cache_dir": cache_dir, "network": "none",
        "memory": "2g", "pids_limit": 512, "cpus": 2.0, "cache_mode": "shared",
        "user": "1000:1000", "worker_id": worker_id, "goproxy": f"file://{proxy}",
    }
    settings.update(overrides)
    return DockerSandbox(**settings)


def builder(sandbox: Sandbox, proxy: Path) -> Builder:
    """Return a Builder fetching from the synthetic proxy at ``proxy``."""
    return Builder(sandbox=sandbox, goproxy=f"file://{proxy}", gosumdb="off",
                   fetch_timeout=FETCH_TIMEOUT_SECONDS, compile_timeout=COMPILE_TIMEOUT_SECONDS)
