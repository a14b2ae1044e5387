"""The build service: from a validated request to a queued (or already built) build."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.queue import QueueManager
from kiln.spec import BuildRequest, BuildSpec
from kiln.versions import Resolver, resolve_spec

#: seconds the sandbox identity read from the workers table is reused
TOOLCHAIN_CACHE_SECONDS = 5.0


class NoToolchain(Exception):
    """No worker has ever registered, so no build key can be made yet."""


@dataclass(frozen=True)
class Submitted:
    key: str
    build: dict[str, Any]
    #: true when this request put the build on the queue
    queued: bool
    spec: BuildSpec


class BuildService:
    """Resolve requests, key them, and queue each key once."""

    def __init__(
        self,
        *,
        queue: QueueManager,
        resolver: Resolver,
        tags: tuple[str, ...] = ("nobadger", "nomysql", "nopgx"),
        ldflags: str = "-w -s",
        max_attempts: int = 3,
        worker_live_seconds: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.tags = tags
        self.ldflags = ldflags
        self.max_attempts = max_attempts
        self.worker_live_seconds = worker_live_seconds
        self.clock = clock
        self._toolchain: tuple[float, tuple[str, str]] | None = None
        self._lock = threading.Lock()

    def toolchain(self) -> tuple[str, str]:
        """Return (sandbox identity, Go version) of the workers, cached briefly."""
        with self._lock:
            cached = self._toolchain
        if cached and self.clock() - cached[0] < TOOLCHAIN_CACHE_SECONDS:
            return cached[1]
        found = self.queue.toolchain(live_seconds=self.worker_live_seconds)
        if found is None:
            raise NoToolchain("no build worker has registered yet: start a worker")
        with self._lock:
            self._toolchain = (self.clock(), found)
        return found

    def resolve(self, request: BuildRequest) -> BuildSpec:
        """Resolve every version query to an absolute version and return the spec."""
        sandbox, go_version = self.toolchain()
        return resolve_spec(request, self.resolver, go_version=go_version, sandbox=sandbox,
                            tags=self.tags, ldflags=self.ldflags)

    def submit(self, request: BuildRequest, *, priority: int = 0,
               requested_by: str | None = None) -> Submitted:
        """Resolve and queue a build (once per key); return its current row."""
        spec = self.resolve(request)
        key = spec.key()
        result = self.queue.enqueue(key, spec.to_dict(), priority=priority,
                                    max_attempts=self.max_attempts, requested_by=requested_by)
        return Submitted(key=key, build=result.build, queued=result.queued, spec=spec)
