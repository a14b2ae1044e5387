"""A per-request budget on module-proxy look-ups: a count of calls and a wall-clock deadline.

One API request (a build, a version look-up) may make Kiln ask the module proxy for many
files: every plugin, every candidate module root of a package path, a list, an @latest and
a go.mod each. Without a bound, one request costs max_plugins x candidates x ~3 upstream
calls, one after the other in one API thread. A `ProxyBudget` is made for each request
(`ProxyLimits.start`) and every HTTP call to the proxy spends from it; answers from the
resolution cache cost nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kiln.errors import KilnError

#: module-proxy HTTP calls one API request may make
MAX_PROXY_CALLS = 64
#: seconds all of one API request's module-proxy calls may take together
PROXY_DEADLINE_SECONDS = 30.0


class ProxyCallsExceeded(KilnError):
    """A request needs more module-proxy look-ups than one request may make: it must ask less."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this request needs more than {limit} module-proxy look-ups: ask for fewer "
            "plugins, or give exact module paths and versions (module@vX.Y.Z)")
        self.limit = limit


class ProxyDeadlineExceeded(KilnError):
    """The module proxy did not answer a request's look-ups within its deadline: retryable."""

    def __init__(self, deadline: float) -> None:
        super().__init__(
            f"the Go module proxy did not answer within {deadline:g} s: try again shortly")
        self.deadline = deadline


class ProxyBudget:
    """What one request may still spend on the module proxy: calls left and a deadline."""

    def __init__(self, *, max_calls: int = MAX_PROXY_CALLS,
                 deadline: float = PROXY_DEADLINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_calls = max_calls
        self.deadline = deadline
        self.clock = clock
        self._ends_at = clock() + deadline
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """Return how many proxy calls were spent."""
        with self._lock:
            return self._calls

    def remaining(self) -> float:
        """Return the seconds left before the deadline (0 once past it)."""
        return max(0.0, self._ends_at - self.clock())

    def expired(self) -> bool:
        """Return whether the deadline has passed."""
        return self.remaining() <= 0.0

    def spend(self, timeout: float) -> float:
        """Count one proxy call and return the timeout it may have: never past the deadline.

        Raise ProxyCallsExceeded when every call is spent, ProxyDeadlineExceeded when no
        time is left.
        """
        with self._lock:
            if self._calls >= self.max_calls:
                raise ProxyCallsExceeded(self.max_calls)
            left = self.remaining()
            if left <= 0.0:
                raise self.overdue()
            self._calls += 1
        return min(timeout, left)

    def overdue(self) -> ProxyDeadlineExceeded:
        """Return the error that says the deadline passed."""
        return ProxyDeadlineExceeded(self.deadline)


@dataclass(frozen=True)
class ProxyLimits:
    """The budget each request gets (build.max_proxy_calls, build.proxy_deadline)."""

    max_calls: int = MAX_PROXY_CALLS
    deadline: float = PROXY_DEADLINE_SECONDS

    def start(self, clock: Callable[[], float] = time.monotonic) -> ProxyBudget:
        """Return a fresh budget whose deadline starts now."""
        return ProxyBudget(max_calls=self.max_calls, deadline=self.deadline, clock=clock)
