"""Find the processes of a build's sandbox steps (the process sandbox marks their environment)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def sandbox_processes(key: str) -> list[int]:
    """Return the pids of processes running a build step of ``key``."""
    marker = f"DEV_KILN_SANDBOX={key}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_sandbox_processes(key: str) -> int:
    """Kill the steps a SIGKILLed worker left running (they outlive it); return how many."""
    pids = sandbox_processes(key)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
