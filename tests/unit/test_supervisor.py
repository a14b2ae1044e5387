"""``kiln serve``'s supervisor with real child processes: restart with backoff, crash loops."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.config import ServeConfig
from kiln.standalone import Supervisor
from tests.service import wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
FAILER = [sys.executable, "-c", "import sys; sys.exit(3)"]



def running(supervisor: Supervisor) -> threading.Thread:
    thread = threading.Thread(target=lambda: setattr(thread, "code", supervisor.run()))
    thread.start()
    return thread


def test_a_killed_child_is_started_again_and_a_stop_ends_all(tmp_path: Path) -> None:
    supervisor = Supervisor({"a": SLEEPER, "b": SLEEPER}, env=dict(os.environ),
                            config=ServeConfig(restart_delay=0.1), poll_seconds=0.02)
    thread = running(supervisor)
    first = wait_for("a to start", lambda: supervisor.children["a"].process)
    other = wait_for("b to start", lambda: supervisor.children["b"].process)
    os.kill(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    second = wait_for("a new a", lambda: (p := supervisor.children["a"].process) is not first
                      and p)
    assert second.poll() is None  # type: ignore[attr-defined]
    assert supervisor.children["b"].process is other  # the others are left alone
    supervisor.stop("test")
    thread.join(30)
    assert thread.code == 0  # type: ignore[attr-defined]
    assert second.poll() is not None and other.poll() is not None  # type: ignore[attr-defined]


def test_a_crash_loop_stops_the_service_with_the_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor({"worker": FAILER, "api": SLEEPER}, env=dict(os.environ),
                            config=ServeConfig(restart_delay=0.06, restart_max_delay=0.2,
                                               restart_limit=3, restart_window=30),
                            poll_seconds=0.02)
    with caplog.at_level(logging.INFO, logger="kiln.standalone"):
        started = time.monotonic()
        code = supervisor.run()
    assert code == 1
    assert time.monotonic() - started < 20
    messages = [r.getMessage() for r in caplog.records]
    restarts = [m for m in messages if m.startswith("worker exited with status 3")]
    # the waits double while it keeps failing at once
    assert [m.rsplit(" in ", 1)[1] for m in restarts] == ["0.1s", "0.1s", "0.2s"], restarts
    assert any("worker exited 4 times within 30s (last exit status 3): stopping Kiln" in m
               for m in messages), messages
    assert supervisor.children["api"].process.poll() is not None  # type: ignore[union-attr]


def test_backoff_doubles_and_resets_after_a_stable_run() -> None:
    now = [0.0]
    config = ServeConfig(restart_delay=1, restart_max_delay=4, stable_seconds=60,
                         restart_limit=100, restart_window=1)
    supervisor = Supervisor({"x": SLEEPER}, env={}, config=config, clock=lambda: now[0])
    child = supervisor.children["x"]
    delays = []
    for ran in (1, 1, 1, 1, 100, 1):
        child.started = now[0]
        now[0] += ran
        supervisor._exited(child, 1, now[0])
        delays.append(child.delay)
        now[0] = child.due  # type: ignore[assignment]
    assert delays == [1, 2, 4, 4, 1, 2]
