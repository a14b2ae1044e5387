"""The Falcon WSGI application: ``create_app`` takes its collaborators, reads nothing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import falcon

from kiln.api import admin, attest, events, openapi, ui
from kiln.api.auth import ADMIN, AuthMiddleware, handle_quota
from kiln.api.builds import ArtifactResource, BuildsResource, HealthResource
from kiln.api.compat import add_routes as add_compat_routes
from kiln.api.errors import (
    REQUEST_ID_HEADER,
    handle_kiln_error,
    handle_unexpected,
    request_id,
    serialize_error,
)
from kiln.api.groups import Callbacks, GroupResource
from kiln.api.held import SlotTable
from kiln.api.metrics import MetricsMiddleware, MetricsResource
from kiln.api.principal import parse_networks
from kiln.api.quota import QuotaExceeded
from kiln.api.service import BuildService
from kiln.api.waiter import BuildWaiter
from kiln.artifacts.store import ArtifactStore
from kiln.config import Config
from kiln.db.api_keys import KeyManager
from kiln.db.attestations import AttestManager
from kiln.db.build_logs import BuildLogs
from kiln.db.builds import QueueManager
from kiln.db.groups import GroupManager
from kiln.db.notify import Notifier
from kiln.db.webhooks import WebhookManager
from kiln.errors import KilnError
from kiln.logconfig import bind_context, unbind_context
from kiln.metrics import KilnCollector, MetricsRecorder
from kiln.readiness import Dependency, schema_check
from kiln.request.catalog import Catalog

log = logging.getLogger("kiln.api")


@dataclass
class Services:
    """What the API's resources are built from."""

    config: Config
    queue: QueueManager
    service: BuildService
    store: ArtifactStore
    #: the plugin catalog (/api/packages); None: no catalog configured
    catalog: Catalog | None = None
    #: the process's one LISTEN connection, fanned out to held requests and live watchers
    notifier: Notifier | None = None
    #: build logs (plain text and live events)
    logs: BuildLogs | None = None
    #: API keys; None: made from the queue's pool
    keys: KeyManager | None = None
    #: this process's metrics recorder; None: made from the queue's pool (not flushed on a timer)
    metrics: MetricsRecorder | None = None
    #: this process's held downloads and live streams; None: made from api.max_held*
    slots: SlotTable | None = None


class RequestIdMiddleware:
    """Give every request an id, echo it, and log one line per request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        resp.set_header(REQUEST_ID_HEADER, request_id(req))
        # every line logged while serving this request carries its id
        req.context.log_token = bind_context(request_id=request_id(req))

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        token = req.context.get("log_token")
        if token is not None:
            unbind_context(token)
            req.context.log_token = None
        started = req.context.get("started")
        if started is None:
            return
        log.debug("%s %s %s", req.method, req.relative_uri, resp.status,
                  extra={"request_id": request_id(req),
                         "duration_ms": round((time.perf_counter() - started) * 1000, 2)})


def readiness(services: Services) -> list[Dependency]:
    """What /healthz checks beside the database: Kiln's schema in it, and the store."""
    pool = services.queue.pool
    return [Dependency("schema", schema_check(lambda: pool.connection(timeout=2),
                                              "the database")),
            Dependency("store", services.store.check)]


def create_app(services: Services) -> falcon.App:
    """Return the WSGI app serving Kiln's HTTP API."""
    config = services.config
    keys = services.keys or KeyManager(services.queue.pool)
    metrics = services.metrics or MetricsRecorder(services.queue.pool)
    middleware: list[Any] = [
        RequestIdMiddleware(),
        MetricsMiddleware(metrics),
        AuthMiddleware(keys=keys, mode=config.auth.mode,
                       trusted_proxies=parse_networks(config.api.trusted_proxies)),
    ]
    app = falcon.App(middleware=middleware, cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = False
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(KilnError, handle_kiln_error)  # type: ignore[arg-type]
    app.add_route("/healthz", HealthResource(queue=services.queue, checks=readiness(services)))
    pool = services.queue.pool
    # several platforms per request, and webhooks to the callback_url a request names
    groups = GroupManager(pool)
    callbacks = Callbacks(webhooks=WebhookManager(pool),
                          allow_private=config.webhooks.allow_private,
                          public_url=config.api.public_url.rstrip("/"))
    app.add_route("/api/builds", BuildsResource(
        service=services.service, queue=services.queue,
        max_body_bytes=config.api.max_body_bytes, max_plugins=config.build.max_plugins,
        callbacks=callbacks, groups=groups))
    app.add_route("/api/groups/{gid}", GroupResource(groups=groups, queue=services.queue))
    # signatures, checksums and attestations of each artifact
    records = AttestManager(pool)
    files: dict[str, Any] = {"queue": services.queue, "store": services.store,
                             "records": records}
    app.add_route("/api/signing-key", attest.SigningKeyResource(records=records))
    app.add_route("/api/builds/{key}/artifact.sig", attest.SignatureResource(**files))
    app.add_route("/api/builds/{key}/artifact.sha256", attest.ChecksumResource(**files))
    app.add_route("/api/builds/{key}/provenance", attest.ProvenanceResource(**files))
    app.add_route("/api/builds/{key}/sbom", attest.SbomResource(**files))
    app.add_route("/api/artifacts/{sha256}", attest.ArtifactLookupResource(records=records))
    app.add_route("/api/builds/{key}", admin.CancellableBuildResource(queue=services.queue))
    app.add_route("/api/builds/{key}/artifact", ArtifactResource(
        queue=services.queue, store=services.store,
        redirect=config.storage.serve == "redirect"))
    # held downloads and live streams each keep a thread: capped per client and in all, so
    # that the process keeps threads for /healthz and ordinary requests
    slots = services.slots or SlotTable(limit=config.api.held_limit,
                                        per_client=config.api.held_per_client_limit)
    if services.logs is not None:
        events.add_routes(app, queue=services.queue, logs=services.logs,
                          notifier=services.notifier, slots=slots,
                          keepalive=config.build_logs.keepalive_seconds,
                          lifetime=config.api.max_stream_seconds)
    ui.add_routes(app, service=services.service)
    add_compat_routes(
        app, service=services.service, queue=services.queue, store=services.store,
        waiter=BuildWaiter(queue=services.queue, notifier=services.notifier,
                           worker_live_seconds=config.janitor.worker_gone_seconds,
                           worker_wait=config.api.worker_wait),
        slots=slots, catalog=services.catalog, max_wait=config.api.max_wait,
        max_plugins=config.build.max_plugins, redirect=config.storage.serve == "redirect",
        public_url=config.api.public_url, wait_redirects=config.api.wait_redirects)
    admin.add_routes(app, queue=services.queue, store=services.store)
    scrape = MetricsResource(recorder=metrics, collector=KilnCollector(
        pool, worker_live_seconds=config.janitor.worker_gone_seconds), slots=slots)
    if not config.metrics.public:
        scrape.auth = {"GET": ADMIN}
    app.add_route("/metrics", scrape)
    app.add_route("/openapi.json", openapi.OpenApiResource(
        auth_mode=config.auth.mode, metrics_public=config.metrics.public))
    # QuotaExceeded, raised anywhere, is a 429 in the JSON error shape
    app.add_error_handler(QuotaExceeded, handle_quota)  # type: ignore[arg-type]
    return app
