"""Wiring: build Kiln's collaborators from a Config. Only entry points call this."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from kiln.api.app import Services
from kiln.api.quota import QuotaManager
from kiln.artifacts.store import make_store
from kiln.config import Config
from kiln.db.api_keys import KeyManager
from kiln.db.builds import EVENTS_CHANNEL, QueueManager
from kiln.db.notify import Notifier
from kiln.db.pool import connect, make_pool
from kiln.metrics import MeteredSandbox, MetricsRecorder
from kiln.request.catalog import Catalog, CatalogBuildService, CatalogStore
from kiln.resolve.cache import DatabaseResolutionCache
from kiln.resolve.resolver import ModuleProxy, Resolver
from kiln.worker.builder import Builder
from kiln.worker.buildlog import LOGS_CHANNEL, BuildLogs, LogWriter
from kiln.worker.sandbox import make_sandbox


def database_url(config: Config) -> str:
    """Return database.url, or explain how to get one."""
    if not config.database.url:
        raise SystemExit(
            "database.url is not set: set it (or KILN_DATABASE__URL), "
            "or run `kiln serve`, which starts an embedded PostgreSQL"
        )
    return config.database.url


def make_catalog(config: Config, pool: ConnectionPool) -> Catalog | None:
    """Return the plugin catalog the config names, or None when it names none."""
    plugins = config.plugins
    if not plugins.catalog_file and not plugins.catalog_url:
        return None
    return Catalog(store=CatalogStore(pool), url=plugins.catalog_url, ttl=plugins.catalog_ttl,
                   file=Path(plugins.catalog_file) if plugins.catalog_file else None)


def make_services(config: Config, *, application: str = "kiln-api") -> Services:
    """Return the API's collaborators."""
    pool = make_pool(database_url(config), config.database, application=application)
    queue = QueueManager(pool)
    resolver = Resolver(
        ModuleProxy(config.build.goproxy, timeout=config.build.proxy_timeout),
        cache=DatabaseResolutionCache(queue, latest_ttl=config.build.latest_ttl),
        latest_ttl=config.build.latest_ttl,
    )
    catalog = make_catalog(config, pool)
    metrics = MetricsRecorder(pool, flush_seconds=config.metrics.flush_seconds).start()
    service = CatalogBuildService(
        catalog=catalog, allow=config.plugins.allow,
        queue=queue, resolver=resolver, tags=tuple(config.build.tags),
        ldflags=config.build.ldflags, max_attempts=config.worker.max_attempts,
        worker_live_seconds=config.janitor.worker_gone_seconds,
        quota=QuotaManager.from_config(pool, config.quota), metrics=metrics,
    )
    url = database_url(config)

    def listen() -> psycopg.Connection:
        return connect(url, config.database, application=f"{application}-listen")

    # one LISTEN connection per process for every held request and live watcher
    notifier = Notifier(listen, channels=[EVENTS_CHANNEL, LOGS_CHANNEL])
    return Services(config=config, queue=queue, service=service,
                    store=make_store(config.storage), catalog=catalog, notifier=notifier,
                    logs=BuildLogs(pool), keys=KeyManager(pool), metrics=metrics)


def make_worker(config: Config, *, max_jobs: int = 0, idle_exit: float = 0.0) -> object:
    """Return a Worker wired from the config."""
    from kiln.worker.loop import Worker

    url = database_url(config)
    # asynchronous commit: a worker's writes (claims, leases, completions, logs) that a
    # server crash loses only make a build run again (a lost claim is claimed anew, a lost
    # completion's lease expires), and keys are content-addressed; a commit no longer waits
    # for the WAL flush, which tripled claim throughput (bench/)
    pool = make_pool(url, config.database, application="kiln-worker", min_size=1,
                     max_size=max(2, config.worker.concurrency + 2), synchronous_commit=False)
    # step durations go to /metrics through the shared table
    # a configured worker id labels its sandbox containers: a restart removes its own leftovers
    sandbox = MeteredSandbox(make_sandbox(config.build, worker_id=config.worker.id), MetricsRecorder(
        pool, flush_seconds=config.metrics.flush_seconds).start())
    builder = Builder(
        sandbox=sandbox, goproxy=config.build.goproxy, gosumdb=config.build.gosumdb,
        fetch_timeout=config.build.fetch_timeout, compile_timeout=config.build.compile_timeout,
    )

    def listen() -> psycopg.Connection:
        return connect(url, config.database, application="kiln-worker-listen")

    from kiln.worker.attest import make_attestor

    store = make_store(config.storage)
    return Worker(
        attestor=make_attestor(config, pool=pool, store=store),
        queue=QueueManager(pool), builder=builder, store=store,
        listen=listen, work_root=Path(config.build.work_dir), worker_id=config.worker.id,
        concurrency=config.worker.concurrency, lease_seconds=config.worker.lease_seconds,
        heartbeat_seconds=config.worker.heartbeat_seconds,
        poll_seconds=config.worker.poll_seconds,
        retry_base_seconds=config.worker.retry_base_seconds,
        max_jobs=max_jobs, idle_exit=idle_exit,
        log_sinks=LogWriter(
            BuildLogs(pool), batch_lines=config.build_logs.batch_lines,
            flush_seconds=config.build_logs.flush_seconds,
            max_line_length=config.build_logs.max_line_length,
            max_lines=config.build_logs.max_lines),
    )
