"""The build service: from a validated request to a queued (or already built) build."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiln.api.quota import QuotaExceeded
from kiln.config import DEFAULT_TAGS
from kiln.db.builds import Build, QueueManager
from kiln.errors import KilnError
from kiln.request.catalog import CatalogPolicy
from kiln.request.spec import BuildRequest, BuildSpec
from kiln.resolve.resolver import Resolver, resolve_spec

if TYPE_CHECKING:
    from kiln.api.principal import Principal
    from kiln.api.quota import QuotaManager
    from kiln.metrics import MetricsRecorder

#: seconds the sandbox identity read from the workers table is reused
TOOLCHAIN_CACHE_SECONDS = 5.0


class NoToolchain(KilnError):
    """No worker has ever registered, so no build key can be made yet."""


@dataclass(frozen=True)
class Submitted:
    key: str
    build: Build
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
        tags: tuple[str, ...] = DEFAULT_TAGS,
        ldflags: str = "-w -s",
        max_attempts: int = 3,
        worker_live_seconds: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        quota: QuotaManager | None = None,
        metrics: MetricsRecorder | None = None,
        policy: CatalogPolicy | None = None,
    ) -> None:
        self.queue = queue
        #: what may be built (plugins mapped through the catalog, plugins.allow); every way
        #: of submitting (/api/builds, /api/download, /api/compat) passes through resolve()
        self.policy = policy
        self.quota = quota
        self.metrics = metrics
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
        """Admit the request (the catalog policy), resolve every version query to an
        absolute version, and return the spec."""
        if self.policy is not None:
            request = self.policy.admit(request)
        sandbox, go_version = self.toolchain()
        # one module-proxy budget for the whole request, however many plugins it names
        return resolve_spec(request, self.resolver.for_request(), go_version=go_version,
                            sandbox=sandbox, tags=self.tags, ldflags=self.ldflags)

    def submit(self, request: BuildRequest, *, priority: int | None = None,
               requested_by: str | None = None,
               principal: Principal | None = None) -> Submitted:
        """Resolve and queue a build (once per key); return its current row.

        With a ``principal`` (who asked: the API passes the sender of every HTTP request,
        kiln/api/builds.py submit) its key's priority and the quotas apply, and it is
        recorded as the requester; QuotaExceeded is raised over a limit. Without one (a
        build Kiln asks for itself) neither applies.
        """
        admit = None
        if principal is not None:
            priority = principal.priority if priority is None else priority
            requested_by = requested_by or principal.requester
        try:
            if principal is not None and self.quota is not None:
                self.quota.check_request(principal)
                admit = self.quota.admitter(principal)
            spec = self.resolve(request)
            key = spec.key()
            result = self.queue.enqueue(key, spec.to_dict(), priority=priority or 0,
                                        max_attempts=self.max_attempts,
                                        requested_by=requested_by, admit=admit)
        except QuotaExceeded as exc:
            if self.metrics is not None:
                who = "key" if principal is not None and principal.key else "anonymous"
                self.metrics.inc("kiln_quota_rejections_total",
                                 {"limit": exc.limit, "principal": who})
            raise
        if self.metrics is not None:
            state = result.build.state
            outcome = ("miss" if result.queued else "hit" if state == "succeeded"
                       else "joined" if state in ("queued", "running") else "finished")
            self.metrics.inc("kiln_build_requests_total", {"result": outcome})
        return Submitted(key=key, build=result.build, queued=result.queued, spec=spec)

