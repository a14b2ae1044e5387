"""The janitor: keeps the queue and storage healthy, on a schedule or once per invocation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import schedule

from kiln.config import Config
from kiln.db import make_pool, migrate
from kiln.queue import QueueManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    interval: float
    run: Callable[[], object]


class Janitor:
    """Run maintenance jobs; safe to run several janitors at once (SKIP LOCKED / idempotent)."""

    def __init__(self, *, queue: QueueManager, migrate: Callable[[], list[str]],
                 jobs: list[Job]) -> None:
        self.queue = queue
        self.migrate = migrate
        self.jobs = jobs
        self._stop = threading.Event()
        self.scheduler = schedule.Scheduler()

    @classmethod
    def from_config(cls, config: Config, *, url: str) -> Janitor:
        """Wire a janitor and its jobs from the config."""
        queue = QueueManager(make_pool(url, config.database, application="kiln-janitor",
                                       min_size=1, max_size=2))
        jobs = [
            Job("requeue_expired", config.janitor.requeue_interval, queue.requeue_expired),
            Job("mark_gone_workers", config.janitor.worker_interval,
                lambda: queue.mark_gone_workers(seconds=config.janitor.worker_gone_seconds)),
            Job("expire_resolutions", max(config.build.latest_ttl, 10.0),
                queue.expire_resolutions),
        ]
        return cls(queue=queue, migrate=lambda: migrate(url, config.database), jobs=jobs)

    def _run_job(self, job: Job) -> None:
        try:
            result = job.run()
        except Exception:
            log.exception("janitor job %s failed", job.name)
            return
        if result:
            log.info("janitor job %s: %s", job.name, result)

    def run_once(self) -> None:
        """Apply migrations, then run every job once."""
        applied = self.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        for job in self.jobs:
            self._run_job(job)

    def stop(self) -> None:
        """Stop run_forever (safe from a signal handler)."""
        self._stop.set()

    def run_forever(self) -> None:
        """Apply migrations, then run each job on its interval until stopped."""
        self.run_once()
        for job in self.jobs:
            # schedule takes float intervals although its annotation says int
            self.scheduler.every(job.interval).seconds.do(  # type: ignore[arg-type]
                self._run_job, job)
        while not self._stop.is_set():
            self.scheduler.run_pending()
            idle = self.scheduler.idle_seconds
            self._stop.wait(min(max(idle or 1.0, 0.05), 1.0))
        log.info("janitor stopped")
