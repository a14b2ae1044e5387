"""The janitor: keeps the queue and storage healthy, on a schedule or once per invocation.

Jobs (each with its own interval, see ``janitor`` in the config):

- ``requeue_expired``: running builds whose lease ran out (worker killed or cut off) go back
  to the queue at once, the attempt recorded as lost; past ``max_attempts`` they fail.
- ``mark_gone_workers``: workers without a heartbeat are marked gone.
- ``fail_unclaimable``: queued builds keyed with a toolchain (sandbox identity, Go version)
  no worker has offered for ``unclaimable_after`` fail, saying which toolchain they need
  and which the workers offer.
- ``expire_resolutions``: "latest" resolutions past their TTL are deleted.
- ``storage_gc``: artifacts past their retention, then over the size budget, are deleted
  (kiln/janitor/gc.py); the build row stays, so the next request rebuilds it.
- ``prune``: build log lines, attempt history and gone workers past their retention.
- ``deliver_webhooks``: callbacks of finished builds are POSTed, retried with backoff
  (kiln/janitor/webhooks.py).
- ``modcache_gc`` (``modcache.enabled``): module cache entries past ``modcache.max_age``,
  then the oldest over ``modcache.max_bytes``, are deleted (kiln/janitor/modcache_gc.py).
- ``prebuild`` (``janitor.prebuild.enabled``): when "latest" of Caddy or of a popular
  plugin resolves to a new release, the most downloaded configurations are queued on it,
  below every user's priority, so their first request is a hit (kiln/janitor/prebuild.py).

Retries of retryable failures are not a janitor job: the worker that saw the failure puts
the build back in the same statement, with ``run_after`` set by exponential backoff with
jitter (kiln/worker/loop.py ``backoff``), so a client never sees a "failed" that later turns
into "queued". Migrations are applied at start.

Any number of janitors may run at once. Each job runs under a PostgreSQL advisory lock
(another janitor skips it meanwhile) and takes its turn from ``kiln_janitor_runs``, so that
between them all, janitors run each job about once per interval; the queries themselves are
safe to run concurrently as well (``FOR UPDATE SKIP LOCKED``, row locks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
import schedule

from kiln.db.builds import QueueManager
from kiln.db.maintenance import Maintenance

log = logging.getLogger(__name__)

#: a job's turn is free again after this fraction of its interval, so that one janitor's
#: schedule (which fires a little early or late) never skips a turn, while several janitors
#: (or one-shot runs more frequent than the interval) run the job about once per interval
TURN_GAP_FRACTION = 0.8
#: delay between attempts to apply migrations at start while the database is unreachable
MIGRATE_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class Job:
    name: str
    interval: float
    run: Callable[[], object]


def describe(result: object) -> str:
    """Return a short text for what a job did (logged and kept in kiln_janitor_runs)."""
    if result is None:
        return ""
    if isinstance(result, list | tuple | set):
        items = [str(r) for r in list(result)[:10]]
        return f"{len(result)}: " + ", ".join(items) + (", ..." if len(result) > 10 else "")
    return str(result)


class Janitor:
    """Run maintenance jobs; any number of janitors may run at once without acting twice."""

    def __init__(self, *, queue: QueueManager, migrate: Callable[[], list[str]],
                 jobs: list[Job], maintenance: Maintenance | None = None) -> None:
        self.queue = queue
        self.migrate = migrate
        self.jobs = jobs
        self.maintenance = maintenance or Maintenance(queue.pool)
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._unreachable = False
        self.scheduler = schedule.Scheduler()

    def job(self, name: str) -> Job:
        """Return the job called ``name``; KeyError lists the known ones."""
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(f"no janitor job {name!r}; jobs: {', '.join(j.name for j in self.jobs)}")

    def run_job(self, job: Job, *, force: bool = False) -> str:
        """Run one job if it is due (or ``force``) and no other janitor runs it.

        Returns "done", "failed", "busy" (another janitor holds it) or "not due".
        """
        try:
            with self.maintenance.job_lock(job.name) as locked:
                if self._unreachable:
                    log.info("the database is reachable again")
                    self._unreachable = False
                if not locked:
                    log.debug("janitor job %s: another janitor is running it", job.name)
                    return "busy"
                gap = 0.0 if force else job.interval * TURN_GAP_FRACTION
                if not self.maintenance.take_turn(job.name, min_gap=gap):
                    log.debug("janitor job %s: not due", job.name)
                    return "not due"
                started = time.monotonic()
                try:
                    result = job.run()
                except Exception as exc:
                    log.exception("janitor job %s failed", job.name)
                    self.maintenance.finish_turn(job.name, ok=False,
                                                 result=f"{type(exc).__name__}: {exc}")
                    return "failed"
                text = describe(result)
                self.maintenance.finish_turn(job.name, ok=True, result=text)
                # quiet when there was nothing to do; every action is worth a line
                log.log(logging.INFO if result else logging.DEBUG, "janitor job %s (%.2fs): %s",
                        job.name, time.monotonic() - started, text or "nothing to do")
                return "done"
        except psycopg.Error as exc:
            # the database is unreachable: the next turn tries again (one warning an outage)
            log.log(logging.DEBUG if self._unreachable else logging.WARNING,
                    "janitor job %s skipped: %s", job.name, exc)
            self._unreachable = True
            return "failed"

    def run_once(self, *, only: Sequence[str] = ()) -> dict[str, str]:
        """Apply migrations, then run every due job (or the ``only`` ones, due or not)."""
        applied = self.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        chosen = [self.job(name) for name in only] if only else self.jobs
        return {job.name: self.run_job(job, force=bool(only)) for job in chosen}

    def stop(self) -> None:
        """Stop run_forever (safe from a signal handler)."""
        self._stop.set()

    def _migrate_until_done(self) -> bool:
        while not self._stop.is_set():
            try:
                applied = self.migrate()
            except psycopg.OperationalError as exc:
                log.warning("cannot apply migrations yet (%s); retrying", exc)
                self._stop.wait(MIGRATE_RETRY_SECONDS)
                continue
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            return True
        return False

    def _spawn(self, job: Job) -> None:
        # one thread per job, so a long storage GC never delays the lease-expiry sweep
        running = self._threads.get(job.name)
        if running is not None and running.is_alive():
            return
        thread = threading.Thread(target=self.run_job, args=(job,),
                                  name=f"kiln-janitor-{job.name}", daemon=True)
        self._threads[job.name] = thread
        thread.start()

    def run_forever(self) -> None:
        """Apply migrations, then run each job on its interval until stopped."""
        if not self._migrate_until_done():
            return
        log.info("janitor ready: %s", ", ".join(f"{j.name} every {j.interval:g}s"
                                               for j in self.jobs))
        for job in self.jobs:
            self._spawn(job)
            # schedule takes float intervals although its annotation says int
            self.scheduler.every(job.interval).seconds.do(  # type: ignore[arg-type]
                self._spawn, job)
        while not self._stop.is_set():
            self.scheduler.run_pending()
            idle = self.scheduler.idle_seconds
            self._stop.wait(min(max(idle or 1.0, 0.05), 1.0))
        for thread in list(self._threads.values()):
            thread.join(timeout=10)
        log.info("janitor stopped")
