"""The worker: LISTEN for queued builds, claim them, build in a sandbox, store, complete."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg

from kiln.artifacts.provenance import utc_now
from kiln.artifacts.store import ArtifactStore, StorageError, file_sha256
from kiln.db.builds import Claimed, QueueManager
from kiln.db.notify import CANCEL_CHANNEL, QUEUE_CHANNEL
from kiln.logconfig import bind_context, unbind_context
from kiln.request.spec import BuildSpec
from kiln.worker.attest import Attestor
from kiln.worker.builder import (
    Builder,
    BuildFailure,
    BuildOutput,
    Cancelled,
    LogSink,
    clip_error,
)
from kiln.worker.sandbox.base import SandboxError
from kiln.worker.trim import CacheTrimmer

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
HEARTBEAT_SECONDS = 10.0
POLL_SECONDS = 5.0
#: longest the main loop sleeps before checking whether it must stop
TICK_SECONDS = 0.25
RECONNECT_SECONDS = 1.0
#: seconds of downloads that rank the builds a starting worker warms up with
WARM_UP_WINDOW_SECONDS = 7 * 86400.0
#: seconds between two trims of the worker's Go caches (build.cache_max_bytes)
TRIM_SECONDS = 300.0


def default_worker_id() -> str:
    """Return hostname-pid-random: unique across restarts and hosts."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def backoff(attempt: int, base: float, *, rand: Callable[[], float] = random.random) -> float:
    """Return seconds before retry ``attempt``+1: exponential with ±50% jitter."""
    return base * (2 ** max(attempt - 1, 0)) * (0.5 + rand())


LogSinkFactory = Callable[[str, int], LogSink]


def logging_sink(key: str, attempt: int) -> LogSink:
    """Return a sink that writes build output to the worker's own log at DEBUG."""

    def sink(step: str, line: str) -> None:
        log.debug("%s", line, extra={"build_key": key, "step": step})

    return sink


@dataclass
class _Running:
    claimed: Claimed
    cancel: threading.Event = field(default_factory=threading.Event)
    #: why it was cancelled: "lost" (lease taken away), "stopping" (worker shutting down)
    #: or "cancelled" (a user or an admin cancelled it)
    reason: str = ""
    #: its completion is being recorded: a lease missing from then on is its end, not a loss
    finishing: bool = False


class Worker:
    """Claim and run builds until told to stop."""

    def __init__(
        self,
        *,
        queue: QueueManager,
        builder: Builder,
        store: ArtifactStore,
        listen: Callable[[], psycopg.Connection],
        work_root: Path,
        worker_id: str = "",
        concurrency: int = 2,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        retry_base_seconds: float = 10.0,
        max_jobs: int = 0,
        idle_exit: float = 0.0,
        log_sinks: LogSinkFactory = logging_sink,
        attestor: Attestor | None = None,
        trimmer: CacheTrimmer | None = None,
        trim_seconds: float = TRIM_SECONDS,
        warm_up: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.builder = builder
        self.store = store
        self.listen = listen
        self.work_root = work_root.resolve()
        self.id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.retry_base_seconds = retry_base_seconds
        self.max_jobs = max_jobs
        self.idle_exit = idle_exit
        self.log_sinks = log_sinks
        self.attestor = attestor
        #: keeps the Go caches within build.cache_max_bytes, only while no build runs
        self.trimmer = trimmer
        self.trim_seconds = trim_seconds
        #: most downloaded builds whose fleet caches a starting worker restores first
        self.warm_up = warm_up
        self.clock = clock
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._started_jobs = 0
        self._finished_jobs = 0
        self._last_busy = clock()
        #: builds that left the running set and still share what they fetched and compiled
        self._sharing = 0
        self._next_trim = 0.0
        #: (sandbox identity, Go version) this worker builds with; read when run() starts
        self._toolchain = ("", "")

    # lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and hand running builds back to the queue (safe from signals)."""
        self.stopping.set()
        self._wake.set()

    def run(self) -> None:
        """Run until stop() is called, max_jobs are done, or idle_exit passes."""
        sandbox = self.builder.sandbox
        self.work_root.mkdir(parents=True, exist_ok=True)
        removed = sandbox.cleanup_orphans()
        if removed:
            log.info("removed %d sandbox(es) left by a previous worker", removed)
        # claimed builds are those keyed with this sandbox and Go: what is built and
        # attested is what the key names, whatever else the fleet runs
        self._toolchain = (sandbox.identity, sandbox.go_version())
        self.queue.register_worker(self.id, hostname=socket.gethostname(), pid=os.getpid(),
                                   concurrency=self.concurrency, sandbox=self._toolchain[0],
                                   go_version=self._toolchain[1])
        log.info("worker %s ready: concurrency %d, sandbox %s", self.id, self.concurrency,
                 sandbox.identity)
        heart = threading.Thread(target=self._heartbeat_loop, name="kiln-heartbeat", daemon=True)
        heart.start()
        listener = threading.Thread(target=self._listen_loop, name="kiln-listen", daemon=True)
        listener.start()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kiln-build")
        try:
            self._warm_up()
            self._claim_loop(pool)
        finally:
            self.stopping.set()
            self._hand_back()  # cancel sandboxes first: the state update can wait
            self._set_state("draining")
            pool.shutdown(wait=True)
            self._set_state("gone")
            log.info("worker %s stopped", self.id)

    def _warm_up(self) -> None:
        """Restore the module sets and compiled packages of the most downloaded builds, so
        that a fresh worker builds them (and what shares their modules) as a warm one."""
        if not self.warm_up:
            return
        started = self.clock()
        try:
            popular = self.queue.popular_builds(
                sandbox=self._toolchain[0], go_version=self._toolchain[1],
                window=WARM_UP_WINDOW_SECONDS, limit=self.warm_up)
        except psycopg.Error as exc:
            log.warning("worker %s: no warm-up, cannot read the popular builds: %s", self.id,
                        exc)
            return
        warmed = 0
        for key, spec in popular:
            if self.stopping.is_set():
                break
            try:
                warmed += self.builder.warm(BuildSpec.from_dict(spec), key=key)
            except Exception:  # a cache fault: the worker builds without it
                log.exception("worker %s: cannot warm up with build %s", self.id, key)
        log.info("worker %s warmed up with %d of the %d most downloaded builds in %.1fs",
                 self.id, warmed, len(popular), self.clock() - started)

    def _set_state(self, state: str) -> None:
        # the database may be down while a preempted worker drains: leases cover that
        try:
            self.queue.set_worker_state(self.id, state)
            log.info("worker %s is %s", self.id, state)
        except psycopg.Error as exc:
            log.warning("cannot mark worker %s %s: %s", self.id, state, exc)

    def _done(self) -> bool:
        if self.stopping.is_set():
            return True
        if self.max_jobs and self._finished_jobs >= self.max_jobs:
            return True
        with self._lock:
            idle = not self._running
        return bool(self.idle_exit and idle and self.clock() - self._last_busy >= self.idle_exit)

    def _claim_loop(self, pool: ThreadPoolExecutor) -> None:
        next_poll = 0.0
        while not self._done():
            with self._lock:
                free = self.concurrency - len(self._running)
                if self.max_jobs:
                    free = min(free, self.max_jobs - self._started_jobs)
            now = self.clock()
            if free > 0 and (self._wake.is_set() or now >= next_poll):
                self._wake.clear()
                next_poll = now + self.poll_seconds
                try:
                    sandbox, go_version = self._toolchain
                    claimed = self.queue.claim(self.id, limit=free,
                                               lease_seconds=self.lease_seconds,
                                               sandbox=sandbox, go_version=go_version)
                except psycopg.Error as exc:
                    log.warning("claim failed, retrying: %s", exc)
                    claimed = []
                    # retry soon, not after a whole poll: the wake-up that a reconnected
                    # listener gives may have been spent on this failed claim
                    next_poll = self.clock() + RECONNECT_SECONDS
                for job in claimed:
                    self._start(pool, job)
                if len(claimed) == free and free > 0:
                    continue  # there may be more: claim again once a slot frees
            self._trim_if_idle()
            self._wake.wait(min(TICK_SECONDS, max(next_poll - self.clock(), 0.0)) or TICK_SECONDS)

    def _start(self, pool: ThreadPoolExecutor, job: Claimed) -> None:
        running = _Running(job)
        with self._lock:
            old = self._running.get(job.key)
            if old is not None and not old.reason:
                # this worker lost the build (its lease expired while the database was out
                # of reach) and claimed it again: the old attempt must stop, and can no
                # longer finish the build (complete and fail name their attempt)
                log.warning("build %s was claimed again (attempt %d); stopping attempt %d",
                            job.key, job.attempt, old.claimed.attempt,
                            extra={"build_key": job.key})
                old.reason = "lost"
                old.cancel.set()
            self._running[job.key] = running
            self._started_jobs += 1
            self._last_busy = self.clock()
        pool.submit(self._execute, running)

    def _trim_if_idle(self) -> None:
        """Trim the Go caches if due and no build runs (a compile may read any cached file).

        Builds start only from this thread, so none starts during a trim; a notification
        stops it between two deletions, and the claim comes first.
        """
        if self.trimmer is None or self.clock() < self._next_trim:
            return
        with self._lock:
            if self._running or self._sharing:
                return
        self._next_trim = self.clock() + self.trim_seconds
        try:
            self.trimmer.trim(stop=lambda: self.stopping.is_set() or self._wake.is_set())
        except Exception:  # the disk: the worker goes on building
            log.exception("cannot trim the worker's Go caches")

    # notifications and heartbeats ---------------------------------------------------

    def _listen_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.listen() as conn:
                    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    conn.execute(f"LISTEN {CANCEL_CHANNEL}")
                    self._wake.set()  # a notification may have been missed while away
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=TICK_SECONDS * 4):
                            if note.channel == CANCEL_CHANNEL:
                                self.cancel(note.payload)
                            else:
                                self._wake.set()
            except psycopg.Error as exc:
                if self.stopping.is_set():
                    return
                log.warning("listener lost its connection, reconnecting: %s", exc)
                self.stopping.wait(RECONNECT_SECONDS)

    def cancel(self, key: str) -> bool:
        """Stop build ``key`` if this worker runs it (it was cancelled); tell whether it did."""
        with self._lock:
            running = self._running.get(key)
        if running is None or running.reason:
            return False
        log.info("build %s was cancelled; stopping it", key, extra={"build_key": key})
        running.reason = "cancelled"
        running.cancel.set()
        return True

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.heartbeat_seconds):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Extend the leases of running builds; cancel those this worker lost."""
        with self._lock:
            keys = list(self._running)
        try:
            self.queue.worker_heartbeat(self.id)
            held = self.queue.extend_leases(self.id, keys, lease_seconds=self.lease_seconds)
        except psycopg.Error as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        for key in set(keys) - held:
            with self._lock:
                running = self._running.get(key)
            if running is not None and not running.reason and not running.finishing:
                log.warning("build %s was taken away from this worker; stopping it", key,
                            extra={"build_key": key})
                running.reason = "lost"
                running.cancel.set()

    def _hand_back(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for r in running:
            if not r.reason:
                r.reason = "stopping"
            r.cancel.set()

    # one build ----------------------------------------------------------------------

    def _execute(self, running: _Running) -> None:
        job = running.claimed
        key = job.key
        sink = self.log_sinks(key, job.attempt)
        workdir = self.work_root / f"{key[:16]}-{job.attempt}-{uuid.uuid4().hex[:8]}"
        context = bind_context(build_key=key)  # on every line logged about this build
        shared: BuildOutput | None = None
        try:
            shared = self._build(job, sink, workdir, running)
        except Cancelled:
            if running.reason == "stopping":
                self.queue.release(key, self.id, outcome="preempted", attempt=job.attempt)
                sink("result", "worker stopped; build handed back to the queue")
                log.info("handed %s back to the queue", key, extra={"build_key": key})
            elif running.reason == "cancelled":  # the database already says cancelled
                sink("result", "cancelled; the sandbox was stopped")
        except BuildFailure as exc:
            running.finishing = True
            self._fail(job, sink, exc.message, retryable=exc.retryable)
        except (StorageError, SandboxError) as exc:
            running.finishing = True
            self._fail(job, sink, f"{type(exc).__name__}: {exc}", retryable=True)
        except Exception as exc:  # a bug or an infrastructure fault: retry, keep the worker up
            running.finishing = True
            log.exception("build %s failed unexpectedly", key, extra={"build_key": key})
            self._fail(job, sink, f"internal error: {exc}", retryable=True)
        finally:
            _remove_tree(workdir)
            with self._lock:
                if self._running.get(key) is running:  # not a newer attempt of the same build
                    del self._running[key]
                self._finished_jobs += 1
                self._last_busy = self.clock()
                if shared is not None:
                    self._sharing += 1  # no trim deletes what it is sharing
            self._wake.set()
            try:
                if shared is not None:
                    # after the build left the running set: its slot is free again and the
                    # heartbeat no longer takes the finished build for one it lost
                    self._publish(key, shared)
            finally:
                if shared is not None:
                    with self._lock:
                        self._sharing -= 1
                unbind_context(context)

    @staticmethod
    def _publish(key: str, shared: BuildOutput) -> None:
        """Share with the fleet what a build that succeeded fetched and compiled."""
        started = time.monotonic()
        try:
            shared.share()
            log.info("build %s: shared with the fleet in %.1fs", key, time.monotonic() - started,
                     extra={"build_key": key})
        except Exception:  # the build is done: a cache fault must not fail it
            log.exception("fleet caches: cannot share what build %s fetched and compiled",
                          key, extra={"build_key": key})

    def _fail(self, job: Claimed, sink: LogSink, message: str, *, retryable: bool) -> None:
        # stored in the build and its attempt, and served by every view of the build
        message = clip_error(message)
        delay = backoff(job.attempt, self.retry_base_seconds)
        state = self.queue.fail(job.key, self.id, error=message, retryable=retryable,
                                retry_after=delay, attempt=job.attempt)
        sink("result", f"failed: {message}")
        log.info("build %s failed (%s): %s", job.key, state, message.splitlines()[0] if message
                 else "", extra={"build_key": job.key})

    def _build(self, job: Claimed, sink: LogSink, workdir: Path,
               running: _Running) -> BuildOutput | None:
        """Build, store and complete ``job``; return its output, to share, if it completed."""
        spec = BuildSpec.from_dict(job.spec)
        sink("resolve", f"caddy {spec.caddy_version} for {spec.os}/{spec.arch}"
             + (f"/v{spec.arm}" if spec.arm else ""))
        for plugin in spec.plugins:
            sink("resolve", f"plugin {plugin.package} ({plugin.module} {plugin.version})")
        started_at = utc_now()
        output = self.builder.build(spec, key=job.key, workdir=workdir, log=sink,
                                    cancel=running.cancel)
        if self.trimmer is not None:  # the modules it compiled with are the last trimmed
            self.trimmer.used(output.go_sum)
        completed = False
        try:
            completed = self._finish(job, spec, output, sink, running, started_at)
        finally:
            # the fleet caches get what a build put only when the build succeeded
            if not completed:
                output.discard()
        return output if completed else None

    def _finish(self, job: Claimed, spec: BuildSpec, output: BuildOutput, sink: LogSink,
                running: _Running, started_at: datetime) -> bool:
        """Store and attest the binary and complete the build; tell whether it completed."""
        cancel = running.cancel
        if cancel.is_set():  # lost or cancelled while compiling: store nothing
            raise Cancelled()
        sink("upload", f"storing {spec.filename}")
        digest = file_sha256(output.binary)
        stored = self.store.put(job.key, spec.filename, output.binary, sha256=digest)
        if self.attestor is not None:  # checksum, signature, provenance, SBOM (kiln/worker/attest.py)
            self.attestor.publish(key=job.key, spec=spec, output=output, sha256=digest,
                                  sandbox=self.builder.sandbox, worker_id=self.id,
                                  attempt=job.attempt, started_at=started_at, log=sink)
        if cancel.is_set():
            raise Cancelled()
        # a heartbeat from here on finds no lease: the build is ending, not lost
        running.finishing = True
        if not self.queue.complete(job.key, self.id, artifact_path=stored.path,
                                   artifact_size=stored.size, artifact_sha256=digest,
                                   attempt=job.attempt):
            log.warning("build %s finished after its lease was taken away",
                        job.key, extra={"build_key": job.key})
            return False
        sink("result", f"succeeded: {stored.size} bytes, sha256 {digest}")
        log.info("built %s in %.1fs", job.key, sum(output.timings.values()),
                 extra={"build_key": job.key})
        return True


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)
