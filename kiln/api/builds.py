"""Kiln's own JSON API: submit builds, see their state, download artifacts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import falcon

from kiln.api.documents import (
    build_document,
    build_links,
    iso,
    load_build,
    read_json,
    request_from_json,
)
from kiln.api.errors import ApiError, bad_request, not_found, unavailable
from kiln.api.groups import Callbacks, group_document, platform_requests
from kiln.api.principal import principal_of
from kiln.api.service import BuildService
from kiln.artifacts.store import ArtifactStore, StorageError
from kiln.db.builds import Build, QueueManager
from kiln.db.groups import GroupManager
from kiln.readiness import Dependency, describe, probe
from kiln.request.callbacks import Webhook
from kiln.request.spec import BuildRequest, BuildSpec

STREAM_CHUNK = 256 * 1024


def submit(service: BuildService, request: BuildRequest, req: falcon.Request) -> Any:
    """Submit for the sender of ``req`` (its priority and quotas apply); the service's
    errors reach the app's KilnError handler, which gives each its HTTP status
    (kiln/api/errors.py STATUSES)."""
    return service.submit(request, principal=principal_of(req))


class BuildsResource:
    """``/api/builds``: submit a build, or list the recent ones."""

    def __init__(self, *, service: BuildService, queue: QueueManager, max_body_bytes: int,
                 max_plugins: int, callbacks: Callbacks | None = None,
                 groups: GroupManager | None = None) -> None:
        self.service = service
        self.queue = queue
        self.max_body_bytes = max_body_bytes
        self.max_plugins = max_plugins
        self.callbacks = callbacks
        self.groups = groups

    def submit_one(self, req: falcon.Request, request: BuildRequest,
                   webhook: Webhook | None) -> Any:
        """Submit one build of this HTTP request and subscribe its callback to it."""
        submitted = submit(self.service, request, req)
        if webhook is not None and self.callbacks is not None:
            self.callbacks.subscribe(webhook, submitted.key, principal=principal_of(req))
        return submitted

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = read_json(req, self.max_body_bytes)
        webhook = None
        if self.callbacks is not None:
            webhook = self.callbacks.check(data)
        elif "callback_url" in data:
            raise bad_request("this server sends no webhooks", field="callback_url")
        if "platforms" in data:
            self._submit_group(req, resp, data, webhook)
            return
        request = request_from_json(data, max_plugins=self.max_plugins)
        submitted = self.submit_one(req, request, webhook)
        doc = build_document(submitted.build, queue=self.queue)
        if webhook is not None:
            doc["webhook"] = webhook.document()
        resp.media = doc
        resp.status = falcon.HTTP_200 if doc["state"] == "succeeded" else falcon.HTTP_202
        resp.location = doc["links"]["self"]

    def _submit_group(self, req: falcon.Request, resp: falcon.Response,
                      data: dict[str, Any], webhook: Webhook | None) -> None:
        """Queue one build per platform and answer with the group document."""
        if self.groups is None:
            raise bad_request("this server does not take several platforms in one request",
                              field="platforms")
        keys: list[str] = []
        for request in platform_requests(data, max_plugins=self.max_plugins):
            submitted = self.submit_one(req, request, webhook)
            if submitted.key not in keys:
                keys.append(submitted.key)
        doc = group_document(self.groups.create(keys), keys, queue=self.queue)
        if webhook is not None:
            doc["webhook"] = webhook.document()
        resp.media = doc
        resp.status = falcon.HTTP_200 if doc["state"] == "succeeded" else falcon.HTTP_202
        resp.location = doc["links"]["self"]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # public "recent builds": what was built, never who asked for it
        limit = req.get_param_as_int("limit", min_value=1, max_value=100, default=20)
        resp.media = {"builds": [
            {"key": row["key"], "state": row["state"], "os": row["spec"]["os"],
             "arch": row["spec"]["arch"], "arm": row["spec"].get("arm") or None,
             "caddy_version": row["spec"]["caddy_version"],
             "plugins": [p["package"] for p in row["spec"].get("plugins", [])],
             "created_at": iso(row["created_at"]), "finished_at": iso(row["finished_at"]),
             "links": build_links(row["key"])}
            for row in self.queue.list_builds(limit=limit)
        ]}


class BuildResource:
    """``/api/builds/{key}``: a build's state."""

    def __init__(self, *, queue: QueueManager) -> None:
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = load_build(self.queue, key)
        doc = build_document(row, queue=self.queue)
        doc["attempt_history"] = [
            {"number": a["number"], "worker_id": a["worker_id"], "outcome": a["outcome"],
             "started_at": iso(a["started_at"]), "finished_at": iso(a["finished_at"]),
             "error": a["error"]}
            for a in self.queue.attempts(key)
        ]
        resp.media = doc


class _Slice:
    """A file-like view of ``length`` bytes of a seekable stream."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self.stream = stream
        self.left = length

    def read(self, size: int | None = -1, /) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def serve_artifact(req: falcon.Request, resp: falcon.Response, *, store: ArtifactStore,
                   queue: QueueManager, row: Build, redirect: bool) -> None:
    """Answer with the artifact of a succeeded build: redirect, or stream with Range support."""
    stored = row.stored_artifact()
    if row.state != "succeeded" or stored is None:
        raise not_found(f"build {row.key} is {row.state}; the artifact exists once it "
                        "has succeeded")
    filename = BuildSpec.from_dict(row.spec).filename
    path, size, sha256 = stored
    etag = f'"{sha256}"'
    if req.method == "GET":
        queue.record_download(row.key)
    if redirect:
        url = store.url(path, filename=filename)
        if url:
            resp.status = falcon.HTTP_302
            resp.location = url
            resp.set_header("Cache-Control", "no-store")
            return
    resp.content_type = "application/octet-stream"
    resp.downloadable_as = filename
    resp.set_header("ETag", etag)
    resp.set_header("Accept-Ranges", "bytes")
    resp.set_header("Cache-Control", "public, max-age=31536000, immutable")
    resp.set_header("X-Checksum-Sha256", sha256)
    if req.if_none_match and any(tag in (sha256, "*") for tag in req.if_none_match):
        resp.status = falcon.HTTP_304
        return
    start, end = 0, size - 1
    if req.range and (req.get_header("If-Range") in (None, etag)):
        first, last = req.range
        if req.range_unit != "bytes":
            raise ApiError(falcon.HTTP_416, "only bytes ranges are served",
                           headers={"Content-Range": f"bytes */{size}"})
        if first < 0:
            start, end = max(size + first, 0), size - 1
        else:
            start, end = first, size - 1 if last < 0 else min(last, size - 1)
        if start >= size or start > end:
            raise ApiError(falcon.HTTP_416, f"range outside the {size}-byte artifact",
                           headers={"Content-Range": f"bytes */{size}"})
        resp.status = falcon.HTTP_206
        resp.set_header("Content-Range", f"bytes {start}-{end}/{size}")
    if req.method == "HEAD":
        resp.content_length = end - start + 1
        return
    try:
        stream = store.open(path)
    except StorageError as exc:
        raise unavailable(f"the artifact cannot be read now: {exc}") from None
    if start or end != size - 1:
        stream.seek(start)
        resp.set_stream(_Slice(stream, end - start + 1), end - start + 1)
    else:
        resp.set_stream(stream, size)


class ArtifactResource:
    """``/api/builds/{key}/artifact``: the binary."""

    def __init__(self, *, queue: QueueManager, store: ArtifactStore, redirect: bool) -> None:
        self.queue = queue
        self.store = store
        self.redirect = redirect

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        serve_artifact(req, resp, store=self.store, queue=self.queue,
                       row=load_build(self.queue, key), redirect=self.redirect)

    on_head = on_get


class HealthResource:
    """``/healthz``: the API process is up, and can reach its database and its store.

    The database is asked on every call; the slower checks (``checks``: the schema, the
    store) are asked again at most every ``ttl`` seconds, so a probe every few seconds
    costs one query. A failure is a 503 naming what is missing and why.
    """

    def __init__(self, *, queue: QueueManager, checks: Sequence[Dependency] = (),
                 ttl: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.checks = tuple(checks)
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._results: dict[str, str | None] = {}

    def _slow_checks(self) -> dict[str, str | None]:
        with self._lock:
            now = self.clock()
            if self._checked_at is None or now - self._checked_at >= self.ttl:
                self._results = probe(self.checks)
                self._checked_at = now
            return self._results

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            with self.queue.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            raise unavailable(f"database unreachable: {type(exc).__name__}") from None
        results = self._slow_checks()
        failed = describe(results)
        if failed:
            raise unavailable(failed)
        resp.media = {"status": "ok", "checks": {"database": "ok", **{
            name: "ok" for name in results}}}
