"""Wiring: build Kiln's collaborators from a Config. Only entry points call this."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import psycopg
from botocore.config import Config as BotoConfig
from docker import DockerClient
from psycopg_pool import ConnectionPool

from kiln.api.app import Services
from kiln.api.quota import QuotaManager
from kiln.api.service import BuildService
from kiln.artifacts.local import LocalStore
from kiln.artifacts.provenance import DEFAULT_BUILDER_ID
from kiln.artifacts.s3 import S3Store
from kiln.artifacts.signing import SigningKeyError, signer_from_settings
from kiln.artifacts.store import ArtifactStore
from kiln.buildcache.blobs import BlobStore, DirectoryBlobs, S3Blobs
from kiln.buildcache.cache import BuildCache
from kiln.buildcache.program import compile_program
from kiln.config import (
    BuildConfig,
    Config,
    ConfigError,
    PreemptionConfig,
    QuotaConfig,
    StorageConfig,
)
from kiln.db.api_keys import KeyManager
from kiln.db.attestations import AttestManager
from kiln.db.build_logs import LOGS_CHANNEL, BuildLogs
from kiln.db.builds import QueueManager
from kiln.db.catalog import CatalogStore
from kiln.db.maintenance import Maintenance
from kiln.db.migrate import migrate
from kiln.db.notify import EVENTS_CHANNEL, Notifier
from kiln.db.pool import connect, make_pool
from kiln.db.prebuilds import PrebuildRecords
from kiln.db.webhooks import WebhookManager
from kiln.errors import KilnError
from kiln.janitor.buildcache_gc import BuildCacheCollector
from kiln.janitor.catalog_mirror import CatalogMirror
from kiln.janitor.gc import StorageCollector
from kiln.janitor.modcache_gc import ModuleCacheCollector
from kiln.janitor.prebuild import Prebuilder
from kiln.janitor.prune import Pruner
from kiln.janitor.scheduler import Janitor, Job
from kiln.janitor.webhooks import Deliverer
from kiln.metrics import MetricsRecorder
from kiln.modproxy.cache import ModuleCache, SumDB
from kiln.modproxy.checksum import parse_gosumdb
from kiln.modproxy.modsets import ModuleSets
from kiln.modproxy.server import ModuleProxyServer
from kiln.modproxy.store import ModuleStore, objects_of
from kiln.modproxy.upstream import Upstream, first_http_proxy
from kiln.readiness import NEEDS, Dependency, Missing, NotReady, database_check
from kiln.request.catalog import Catalog, CatalogPolicy
from kiln.resolve.budget import ProxyLimits
from kiln.resolve.cache import DatabaseResolutionCache
from kiln.resolve.proxy import ModuleProxy
from kiln.resolve.resolver import Resolver
from kiln.worker.attest import Attestor
from kiln.worker.builder import Builder
from kiln.worker.buildlog import LogWriter
from kiln.worker.metered import MeteredSandbox
from kiln.worker.preemption import (
    AwsSpotDetector,
    AzureDetector,
    Detector,
    GceDetector,
)
from kiln.worker.sandbox.base import Sandbox, SandboxError
from kiln.worker.sandbox.docker import DockerSandbox
from kiln.worker.sandbox.docker_engine import (
    MODCACHE_NETWORK,
    docker_client,
    docker_problem,
    docker_unavailable,
    internal_network,
)
from kiln.worker.sandbox.process import find_go
from kiln.worker.trim import CacheTrimmer

if TYPE_CHECKING:
    from kiln.config import BuildConfig


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


def make_resolver(config: Config, queue: QueueManager) -> Resolver:
    """Return the resolver of ``build``'s proxy settings, with the shared PostgreSQL cache."""
    return Resolver(
        ModuleProxy(config.build.goproxy, timeout=config.build.proxy_timeout),
        cache=DatabaseResolutionCache(queue, latest_ttl=config.build.latest_ttl),
        latest_ttl=config.build.latest_ttl,
        limits=ProxyLimits(max_calls=config.build.max_proxy_calls,
                           deadline=config.build.proxy_deadline),
    )


def make_build_service(config: Config, *, queue: QueueManager, catalog: Catalog | None,
                       quota: QuotaManager | None = None,
                       metrics: MetricsRecorder | None = None) -> BuildService:
    """Return the service that turns requests into keys and queued builds (API, prebuilds)."""
    return BuildService(
        policy=CatalogPolicy(catalog, allow=config.plugins.allow,
                             max_plugins=config.build.max_plugins) if catalog else None,
        queue=queue, resolver=make_resolver(config, queue), tags=tuple(config.build.tags),
        ldflags=config.build.ldflags, max_attempts=config.worker.max_attempts,
        worker_live_seconds=config.janitor.worker_gone_seconds, quota=quota, metrics=metrics,
    )


def make_services(config: Config, *, application: str = "kiln-api") -> Services:
    """Return the API's collaborators."""
    pool = make_pool(database_url(config), config.database, application=application)
    queue = QueueManager(pool)
    catalog = make_catalog(config, pool)
    metrics = MetricsRecorder(pool, flush_seconds=config.metrics.flush_seconds).start()
    service = make_build_service(config, queue=queue, catalog=catalog,
                                 quota=make_quota(pool, config.quota), metrics=metrics)
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
    recorder = MetricsRecorder(pool, flush_seconds=config.metrics.flush_seconds).start()
    store = make_store(config.storage)
    # fetch steps read modules through this worker's module proxy, backed by the store
    build, network = (with_module_proxy(config, store=store, metrics=recorder)
                      if config.modcache.enabled and config.modcache.proxy
                      else (config.build, ""))
    # a configured worker id labels its sandbox containers: a restart removes its own leftovers
    sandbox = MeteredSandbox(make_sandbox(build, worker_id=config.worker.id,
                                          fetch_network=network), recorder)
    buildcache = (make_buildcache(config, sandbox=sandbox.inner, counters=sandbox.recorder)
                  if config.buildcache.enabled else None)
    builder = Builder(
        sandbox=sandbox, goproxy=build.goproxy, gosumdb=config.build.gosumdb,
        fetch_timeout=config.build.fetch_timeout, compile_timeout=config.build.compile_timeout,
        buildcache=buildcache,
        modsets=make_modsets(store, sandbox=sandbox.inner, counters=recorder)
        if config.modcache.enabled else None,
    )

    def listen() -> psycopg.Connection:
        return connect(url, config.database, application="kiln-worker-listen")

    return Worker(
        attestor=make_attestor(config, pool=pool, store=store),
        queue=QueueManager(pool), builder=builder, store=store,
        listen=listen, work_root=Path(config.build.work_dir), worker_id=config.worker.id,
        concurrency=config.worker.concurrency, lease_seconds=config.worker.lease_seconds,
        heartbeat_seconds=config.worker.heartbeat_seconds,
        poll_seconds=config.worker.poll_seconds,
        retry_base_seconds=config.worker.retry_base_seconds,
        max_jobs=max_jobs, idle_exit=idle_exit, warm_up=config.worker.warm_up,
        trimmer=make_trimmer(config, sandbox=sandbox.inner, buildcache=buildcache,
                             counters=recorder),
        log_sinks=LogWriter(
            BuildLogs(pool), batch_lines=config.build_logs.batch_lines,
            flush_seconds=config.build_logs.flush_seconds,
            max_line_length=config.build_logs.max_line_length,
            max_lines=config.build_logs.max_lines),
    )

log = logging.getLogger(__name__)


def builder_id_of(config: Config) -> str:
    """Return the provenance builder.id: signing.builder_id, api.public_url, or the default."""
    return config.signing.builder_id or config.api.public_url.rstrip("/") or DEFAULT_BUILDER_ID


def make_attestor(config: Config, *, pool: ConnectionPool, store: ArtifactStore) -> Attestor:
    """Return the worker's Attestor; exit with the field at fault if the key is unreadable."""
    try:
        signer = signer_from_settings(
            key=config.signing.key,
            key_file=Path(config.signing.key_file) if config.signing.key_file else None)
    except SigningKeyError as exc:
        raise SystemExit(f"kiln worker: {exc}") from None
    attestor = Attestor(store=store, signer=signer, records=AttestManager(pool),
                        builder_id=builder_id_of(config))
    if signer is None:
        log.warning("no signing key (signing.key or signing.key_file): artifacts get "
                    "checksums, provenance and SBOMs, but no signatures")
        return attestor
    log.info("signing artifacts with ed25519 key %s", signer.key_id)
    try:
        attestor.register()
    except psycopg.Error as exc:  # the schema may not be migrated yet: publish retries it
        log.warning("cannot record the signing key yet: %s", exc)
    return attestor


def make_store(config: StorageConfig) -> ArtifactStore:
    """Return the store ``storage.backend`` names."""
    if config.backend == "s3":

        return make_s3_store(config)
    return LocalStore(config.local.path)


def make_module_cache(config: Config, *, store: ArtifactStore,
                      metrics: MetricsRecorder | None = None) -> ModuleCache:
    """Return the module cache ``modcache`` describes, reading through ``build.goproxy``."""
    settings = config.modcache
    try:
        upstream = Upstream(first_http_proxy(config.build.goproxy),
                            timeout=settings.upstream_timeout)
        verifier = parse_gosumdb(settings.gosumdb or config.build.gosumdb)
        objects = objects_of(store)
    except KilnError as exc:
        raise ConfigError(f"modcache: {exc}") from None
    return ModuleCache(store=ModuleStore(objects), upstream=upstream,
                       checksums=SumDB(upstream, verifier) if verifier else None,
                       metrics=metrics, list_ttl=settings.list_ttl)


def with_module_proxy(config: Config, *, store: ArtifactStore,
                      metrics: MetricsRecorder | None = None) -> tuple[BuildConfig, str]:
    """Start this worker's module proxy; return ``build`` with its address as GOPROXY.

    With the docker sandbox, fetch steps join an internal network and the proxy listens
    on its gateway (the port of ``modcache.listen``); the network's name is returned too.
    """
    host, _, port = config.modcache.listen.rpartition(":")
    kind, network = sandbox_kind(config.build), ""
    if kind == "docker":
        client = docker_client(required=True)
        assert client is not None
        network = MODCACHE_NETWORK
        host = internal_network(client, network)
    try:
        server = ModuleProxyServer(make_module_cache(config, store=store, metrics=metrics),
                                   host=host, port=int(port)).start()
    except OSError as exc:
        raise ConfigError(f"modcache.listen: cannot listen on {host}:{port}: {exc}") from None
    return config.build.model_copy(update={"goproxy": server.url, "sandbox": kind}), network


def make_modsets(store: ArtifactStore, *, sandbox: Sandbox,
                 counters: MetricsRecorder | None = None) -> ModuleSets:
    """Return the fleet's module sets as this worker's sandbox's module cache holds them."""
    from kiln.worker.sandbox.process import ProcessSandbox

    assert isinstance(sandbox, DockerSandbox | ProcessSandbox)
    return ModuleSets(ModuleStore(objects_of(store)), modcache=sandbox.modcache,
                      adopt=sandbox.adopt, counters=counters)


def make_trimmer(config: Config, *, sandbox: Sandbox, buildcache: BuildCache | None,
                 counters: MetricsRecorder | None = None) -> CacheTrimmer | None:
    """Return what keeps this worker's Go caches within ``build.cache_max_bytes``, if set."""
    from kiln.worker.sandbox.process import ProcessSandbox

    if not config.build.cache_max_bytes:
        return None
    assert isinstance(sandbox, DockerSandbox | ProcessSandbox)
    return CacheTrimmer(limit=config.build.cache_max_bytes, modules=sandbox.modcache,
                        gocache=sandbox.buildcache, buildcache=buildcache, counters=counters)


#: longest directory of the build cache's sockets (a Unix socket's path is at most 107
#: bytes, and the name of one takes 22)
SOCKET_DIR_MAX_CHARS = 80


def make_buildcache_store(config: StorageConfig) -> BlobStore:
    """Return the build cache's part of the artifact store: its ``buildcache/`` prefix."""
    if config.backend == "s3":
        s3 = make_s3_store(config)
        return S3Blobs(client=s3.client, bucket=s3.bucket, prefix=s3.prefix)
    return DirectoryBlobs(config.local.path / "buildcache")


def make_buildcache(config: Config, *, sandbox: Sandbox,
                    counters: MetricsRecorder | None = None) -> BuildCache:
    """Return this worker's build cache: ``<build.cache_dir>/buildcache`` and the store."""
    from kiln.worker.sandbox.process import ProcessSandbox

    local = config.build.cache_dir.resolve() / "buildcache"
    # the docker sandbox runs its image's program; the process sandbox one built here
    program = (compile_program(go=sandbox.go, into=local / "bin")
               if isinstance(sandbox, ProcessSandbox) else Path("/usr/local/bin/kiln-cacheprog"))
    # beside the cache, which the docker engine sees at the same path (a worker in a
    # container), unless that is too long for a Unix socket's path (107 bytes)
    sockets = local / "sock"
    if len(str(sockets)) > SOCKET_DIR_MAX_CHARS:
        sockets = Path(tempfile.gettempdir()) / f"kiln-buildcache-{os.getpid()}"
    return BuildCache(directory=local, store=make_buildcache_store(config.storage),
                      program=program, socket_dir=sockets, counters=counters)


def sandbox_kind(config: BuildConfig) -> str:
    """Return the sandbox ``build.sandbox`` names: ``auto`` resolved (and why logged)."""
    kind = config.sandbox
    if kind == "auto":
        reason = docker_unavailable(config)
        if reason is None:
            kind = "docker"
        else:
            log.warning("build.sandbox auto: using the process sandbox, which isolates the "
                        "environment but not the machine: %s", reason)
    return kind


def make_sandbox(config: BuildConfig, *, worker_id: str = "",
                 fetch_network: str = "") -> Sandbox:
    """Return the sandbox ``build.sandbox`` names.

    ``auto`` picks docker when an engine answers and the sandbox image is there, else
    the process sandbox, and logs why; ``docker`` raises SandboxError saying what is
    missing.
    """
    from kiln.worker.sandbox.process import ProcessSandbox, find_go

    kind = sandbox_kind(config)
    if kind == "docker":
        client = docker_client(required=True)
        assert client is not None
        sandbox = make_docker_sandbox(config, client=client, worker_id=worker_id,
                                      fetch_network=fetch_network)
        log.info("build.sandbox %s: docker, image %s (%s)", config.sandbox,
                 config.docker.image, sandbox.image_id)
        return sandbox
    return ProcessSandbox(go=find_go(config.go), cache_dir=config.cache_dir)


def make_deliverer(config: Config, *, pool: ConnectionPool) -> Deliverer:
    """Return the janitor's Deliverer wired from the config."""
    settings = config.webhooks
    return Deliverer(
        manager=WebhookManager(pool), allow_private=settings.allow_private,
        timeout=settings.timeout, max_attempts=settings.max_attempts, retry_base_seconds=settings.retry_base_seconds,
        max_retry_seconds=settings.max_retry_seconds,
    )


# readiness: what each role needs, as checks (kiln/readiness.py) --------------------------


def store_check(config: Config) -> Callable[[], None]:
    """Make the configured store and ask it whether it can be written."""

    def check() -> None:
        make_store(config.storage).check()

    return check


def engine_check(config: Config) -> Callable[[], None]:
    """Check that the configured sandbox could run a build step here."""

    def check() -> None:
        kind = config.build.sandbox
        if kind in ("docker", "auto"):
            problem = docker_problem(config.build)
            if problem is None:
                return
            reason, transient = problem
            if kind == "docker":
                raise (NotReady if transient else Missing)(f"build.sandbox docker: {reason}")
        try:
            find_go(config.build.go)  # the process sandbox needs a Go toolchain
        except SandboxError as exc:
            raise Missing(str(exc)) from exc

    return check


def make_dependencies(config: Config, role: str, *, url: str) -> list[Dependency]:
    """Return what ``role`` (worker, api, janitor) needs, as checks."""
    checks = {"database": database_check(url, config.database),
              "store": store_check(config), "engine": engine_check(config)}
    return [Dependency(name, checks[name]) for name in NEEDS[role]]


def make_janitor(config: Config, *, url: str) -> Janitor:
    """Return a janitor and its jobs, wired from the config."""
    # each running job holds one connection for its lock and uses at most one more
    pool = make_pool(url, config.database, application="kiln-janitor",
                     min_size=1, max_size=16)
    queue = QueueManager(pool)
    maintenance = Maintenance(pool)
    jc = config.janitor
    collector = StorageCollector(
        maintenance=maintenance, store=make_store(config.storage),
        retention=jc.artifact_retention, budget_bytes=jc.storage_budget_bytes,
        grace_seconds=jc.gc_grace_seconds)
    pruner = Pruner(maintenance=maintenance, log_retention=jc.log_retention,
                    attempt_retention=jc.attempt_retention)
    jobs = [
        Job("requeue_expired", jc.requeue_interval, queue.requeue_expired),
        Job("mark_gone_workers", jc.worker_interval,
            lambda: queue.mark_gone_workers(seconds=jc.worker_gone_seconds)),
        Job("expire_resolutions", jc.resolutions_interval, queue.expire_resolutions),
        # builds keyed with a toolchain the fleet no longer runs (an image or Go rollout)
        *([Job("fail_unclaimable", jc.worker_interval,
               lambda: queue.fail_unclaimable(seconds=jc.unclaimable_after))]
          if jc.unclaimable_after else []),
        Job("storage_gc", jc.gc_interval, collector.collect),
        Job("prune", jc.prune_interval, pruner.prune),
        # callbacks of finished builds (kiln/janitor/webhooks.py)
        Job("deliver_webhooks", config.webhooks.interval,
            make_deliverer(config, pool=pool).run_once),
    ]
    if config.plugins.catalog_url:
        # the mirror behind /api/packages and plugins.allow
        mirror = CatalogMirror(store=CatalogStore(queue.pool), url=config.plugins.catalog_url)
        jobs.append(Job("refresh_catalog", config.plugins.catalog_refresh, mirror.refresh))
    if config.modcache.enabled:
        # the fleet module cache in the store (kiln/janitor/modcache_gc.py)
        modules = ModuleCacheCollector(
            store=ModuleStore(objects_of(make_store(config.storage))),
            max_bytes=config.modcache.max_bytes, max_age=config.modcache.max_age)
        jobs.append(Job("modcache_gc", config.modcache.gc_interval, modules.collect))
    if config.buildcache.enabled:
        # the fleet build cache in the store (kiln/janitor/buildcache_gc.py)
        builds = BuildCacheCollector(store=make_buildcache_store(config.storage),
                                     max_bytes=config.buildcache.max_bytes,
                                     max_age=config.buildcache.max_age)
        jobs.append(Job("buildcache_gc", jc.gc_interval, builds.collect))
    if jc.prebuild.enabled:
        jobs.append(Job("prebuild", jc.prebuild.interval, make_prebuilder(config, pool).run))
    return Janitor(queue=queue, migrate=lambda: migrate(url, config.database), jobs=jobs,
                   maintenance=maintenance)


# each part from its section of the configuration -----------------------------------------


def make_prebuilder(config: Config, pool: ConnectionPool) -> Prebuilder:
    """Return the ``prebuild`` job: popular builds queued on a release, as users ask."""
    queue = QueueManager(pool)
    # no quota, and no build-request metrics: prebuilds count as kiln_prebuilds_total
    service = make_build_service(config, queue=queue, catalog=make_catalog(config, pool))
    return Prebuilder(records=PrebuildRecords(pool), resolver=service.resolver,
                      submit=service.submit, top=config.janitor.prebuild.top,
                      window=config.janitor.prebuild.window,
                      metrics=MetricsRecorder(pool, flush_seconds=config.metrics.flush_seconds))


def make_quota(pool: ConnectionPool, config: QuotaConfig) -> QuotaManager:
    """Return a manager with the configured limits."""
    return QuotaManager(pool, window_seconds=config.window_seconds,
                        anonymous_builds=config.anonymous_builds,
                        key_builds=config.key_builds, requests=config.requests)


def make_docker_sandbox(
    build_config: BuildConfig, *, client: DockerClient, worker_id: str = "",
    fetch_network: str = "",
) -> DockerSandbox:
    """Return the sandbox ``build.docker`` describes."""
    settings = build_config.docker
    return DockerSandbox(
        client=client,
        image=settings.image,
        cache_dir=build_config.cache_dir,
        network=settings.network,
        memory=settings.memory,
        pids_limit=settings.pids_limit,
        cpus=settings.cpus,
        cache_mode=settings.cache_mode,
        user=settings.user,
        worker_id=worker_id,
        goproxy=build_config.goproxy,
        fetch_network=fetch_network,
    )


def make_detectors(config: PreemptionConfig) -> list[Detector]:
    """Return the detectors ``worker.preemption.providers`` names."""
    made: dict[str, Callable[[], Detector]] = {
        "aws": lambda: AwsSpotDetector(config.aws_url, timeout=config.request_timeout),
        "gce": lambda: GceDetector(config.gce_url, timeout=config.request_timeout),
        "azure": lambda: AzureDetector(config.azure_url, timeout=config.request_timeout),
    }
    return [made[name]() for name in dict.fromkeys(config.providers)]


def make_s3_store(config: StorageConfig) -> S3Store:
    """Return a store from ``storage.s3``; empty fields fall back to the AWS chain."""
    s3 = config.s3
    if not s3.bucket:
        raise ConfigError("storage.s3.bucket is empty: name the bucket when "
                          "storage.backend is s3")
    session = boto3.session.Session(
        aws_access_key_id=s3.access_key_id or None,
        aws_secret_access_key=s3.secret_access_key or None,
        region_name=s3.region or None,
    )
    boto_config = BotoConfig(
        signature_version="s3v4",
        s3={"addressing_style": s3.addressing_style},
        retries={"mode": "standard", "max_attempts": 5},
        # an endpoint that does not answer is reported in seconds, not minutes
        connect_timeout=10,
        # gunicorn threads and worker builds share one client
        max_pool_connections=32,
    )
    client = session.client("s3", endpoint_url=s3.endpoint_url or None, config=boto_config)
    presign_client = None
    if s3.public_endpoint_url:
        presign_client = session.client("s3", endpoint_url=s3.public_endpoint_url,
                                        config=boto_config)
    return S3Store(client=client, bucket=s3.bucket, prefix=s3.prefix,
                   multipart_bytes=s3.multipart_bytes, presign_seconds=s3.presign_seconds,
                   presign_client=presign_client)
