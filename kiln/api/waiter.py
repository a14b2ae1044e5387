"""Hold a request until its build is final, without a database connection per request.

A `BuildWaiter` subscribes to the build's key on the process's one `Notifier` (LISTEN
kiln_events) and sleeps on that subscription; it re-reads the build row only when a final
state (or a resync after a lost listener connection) is announced, and polls the row as a
fallback for notifications it may have missed. Between naps it asks the caller whether the
client is still there, so a client that goes away frees its thread within one tick.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kiln.db.builds import FINAL_STATES, Build, QueueManager
from kiln.db.notify import EVENTS_CHANNEL, RESYNC, Notifier

log = logging.getLogger(__name__)

#: seconds between re-reads of the row while notifications cannot be trusted (no listener)
POLL_SECONDS = 5.0
#: seconds between re-reads while the listener is connected (belt and braces)
CONNECTED_POLL_SECONDS = 30.0
#: seconds between checks of the client's connection (and of the deadline)
TICK_SECONDS = 0.5
#: seconds a live-worker count is shared by every waiter of a process
LIVE_CACHE_SECONDS = 2.0
#: toolchains whose live-worker counts a process remembers (one per image rollout or so)
LIVE_CACHE_SIZE = 64

Outcome = Literal["final", "timeout", "gone", "no_worker", "missing"]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class WaitResult:
    """How a wait ended: ``final`` (row is final), ``timeout``, ``gone`` (the client left),
    ``no_worker`` (queued with no live worker of its sandbox and Go for worker_wait
    seconds) or ``missing``."""

    outcome: Outcome
    row: Build | None
    waited: float


def _announced_state(payload: str) -> str | None:
    """Return the state a kiln_events payload announces; None for a resync or garbage."""
    if payload == RESYNC:
        return None
    try:
        state = json.loads(payload)["state"]
    except (ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, str) else None


def toolchain_of(row: Build) -> tuple[str | None, str | None]:
    """Return the sandbox identity and Go version a build is keyed with (None: not named)."""
    sandbox, go_version = row.spec.get("sandbox"), row.spec.get("go_version")
    return (sandbox if isinstance(sandbox, str) else None,
            go_version if isinstance(go_version, str) else None)


class BuildWaiter:
    """Wait for builds to reach a final state: notifications first, polling as a fallback."""

    def __init__(
        self,
        *,
        queue: QueueManager,
        notifier: Notifier | None,
        worker_live_seconds: float,
        worker_wait: float,
        poll_seconds: float = POLL_SECONDS,
        connected_poll_seconds: float = CONNECTED_POLL_SECONDS,
        tick_seconds: float = TICK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.notifier = notifier
        self.worker_live_seconds = worker_live_seconds
        self.worker_wait = worker_wait
        self.poll_seconds = poll_seconds
        self.connected_poll_seconds = connected_poll_seconds
        self.tick_seconds = tick_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._waiting = 0
        self._live: dict[tuple[str | None, str | None], tuple[float, int]] = {}

    def waiting(self) -> int:
        """Return how many requests this process is holding now."""
        with self._lock:
            return self._waiting

    def subscriptions(self) -> int:
        """Return how many notification subscriptions this process has open."""
        return self.notifier.subscribers() if self.notifier is not None else 0

    def live_workers(self, sandbox: str | None = None, go_version: str | None = None) -> int:
        """Return the number of live workers with this sandbox and Go (None: any).

        Only those claim a build keyed with them (see QueueManager.claim). Each count is
        read at most every LIVE_CACHE_SECONDS.
        """
        now = self.clock()
        toolchain = (sandbox, go_version)
        with self._lock:
            cached = self._live.get(toolchain)
        if cached is not None and now - cached[0] < LIVE_CACHE_SECONDS:
            return cached[1]
        count = self.queue.live_workers(seconds=self.worker_live_seconds, sandbox=sandbox,
                                        go_version=go_version)
        with self._lock:
            if len(self._live) >= LIVE_CACHE_SIZE:
                self._live.clear()  # counts are short-lived: start again rather than grow
            self._live[toolchain] = (now, count)
        return count

    def _poll_interval(self) -> float:
        connected = self.notifier is not None and self.notifier.connected.is_set()
        base = self.connected_poll_seconds if connected else self.poll_seconds
        # jitter, so a crowd held for one build does not re-read in lockstep
        return base * random.uniform(0.8, 1.2)

    def wait(self, key: str, *, timeout: float, gone: Callable[[], bool] = _never) -> WaitResult:
        """Wait until build ``key`` is final, the timeout passes, or ``gone()`` says so."""
        started = self.clock()
        deadline = started + timeout
        sub = self.notifier.subscribe(EVENTS_CHANNEL, key) if self.notifier is not None else None
        with self._lock:
            self._waiting += 1
        try:
            # read after subscribing: a change between the two is then never missed
            row = self.queue.get(key)
            next_read = self.clock() + self._poll_interval()
            no_worker_since: float | None = None
            while True:
                now = self.clock()
                if row is None:
                    return WaitResult("missing", None, now - started)
                if row.state in FINAL_STATES:
                    return WaitResult("final", row, now - started)
                if row.state == "queued":
                    if self.live_workers(*toolchain_of(row)) == 0:
                        no_worker_since = now if no_worker_since is None else no_worker_since
                        if now - no_worker_since >= self.worker_wait:
                            return WaitResult("no_worker", row, now - started)
                    else:
                        no_worker_since = None
                if now >= deadline:
                    return WaitResult("timeout", row, now - started)
                if gone():
                    return WaitResult("gone", row, now - started)
                nap = min(self.tick_seconds, deadline - now)
                reread = False
                if sub is not None:
                    payload = sub.wait(nap)
                    while payload is not None:
                        state = _announced_state(payload)
                        if state is None or state in FINAL_STATES:
                            reread = True
                        else:
                            # queued <-> running needs no database read
                            row = dataclasses.replace(row, state=state)
                        payload = sub.wait(0)
                else:
                    time.sleep(max(nap, 0))
                if reread or self.clock() >= next_read:
                    row = self.queue.get(key)
                    next_read = self.clock() + self._poll_interval()
        finally:
            if sub is not None:
                sub.close()
            with self._lock:
                self._waiting -= 1
