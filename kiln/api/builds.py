"""Kiln's own JSON API: submit builds, see their state, download artifacts."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import falcon

from kiln.api.errors import ApiError, bad_request, not_found, unavailable
from kiln.api.groups import Callbacks
from kiln.api.service import BuildService, NoToolchain
from kiln.artifacts.store import ArtifactStore, StorageError
from kiln.db.builds import QueueManager
from kiln.db.groups import GroupManager
from kiln.errors import SpecError
from kiln.readiness import Dependency, describe, probe
from kiln.request.catalog import CatalogUnavailable
from kiln.request.spec import BuildRequest, BuildSpec
from kiln.resolve.proxy import ModuleNotFound, ProxyUnavailable

KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
STREAM_CHUNK = 256 * 1024
BUILD_FIELDS = ("os", "arch", "arm", "caddy_version", "plugins", "replacements",
                # several platforms and webhooks: kiln/api/groups.py
                "platforms", "callback_url")


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def build_links(key: str) -> dict[str, str]:
    """Return the URLs (relative to the server) of a build's resources."""
    base = f"/api/builds/{key}"
    return {"self": base, "artifact": f"{base}/artifact", "log": f"{base}/log",
            "events": f"{base}/events",
            # attestations: kiln/api/attest.py
            "signature": f"{base}/artifact.sig", "checksum": f"{base}/artifact.sha256",
            "provenance": f"{base}/provenance", "sbom": f"{base}/sbom"}


def build_document(row: dict[str, Any], *, queue: QueueManager | None = None) -> dict[str, Any]:
    """Return the public JSON form of a build row."""
    spec = row["spec"]
    doc: dict[str, Any] = {
        "key": row["key"],
        "state": row["state"],
        "os": spec["os"],
        "arch": spec["arch"],
        "arm": spec.get("arm") or None,
        "caddy_version": spec["caddy_version"],
        "plugins": [
            {"package": p["package"], "module": p["module"], "version": p["version"]}
            for p in spec.get("plugins", [])
        ],
        "go_version": spec.get("go_version"),
        "sandbox": spec.get("sandbox"),
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "created_at": _iso(row["created_at"]),
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
        "error": row["error"],
        "retryable": row["error_kind"] == "retryable" if row["error"] else None,
        "links": build_links(row["key"]),
    }
    if row["started_at"] and row["finished_at"]:
        doc["duration_seconds"] = round(
            (row["finished_at"] - row["started_at"]).total_seconds(), 3)
    if row["state"] == "queued" and queue is not None:
        doc["queue_position"] = queue.queue_position(row["key"])
    if row["state"] == "succeeded" and row["artifact_path"]:
        doc["artifact"] = {
            "filename": BuildSpec.from_dict(spec).filename,
            "size": row["artifact_size"],
            "sha256": row["artifact_sha256"],
        }
    return doc


def read_json(req: falcon.Request, max_bytes: int) -> dict[str, Any]:
    """Read a JSON object body of at most ``max_bytes``; 400/413 otherwise."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise ApiError(falcon.HTTP_413, f"request body over {max_bytes} bytes")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(falcon.HTTP_413, f"request body over {max_bytes} bytes")
    if not raw:
        raise bad_request("send a JSON object, e.g. {\"os\": \"linux\", \"arch\": \"amd64\"}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def request_from_json(data: dict[str, Any], *, max_plugins: int) -> BuildRequest:
    """Validate a JSON build request; raise a 400 that names the field at fault."""
    unknown = sorted(set(data) - set(BUILD_FIELDS))
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(unknown)}; accepted: "
                          + ", ".join(BUILD_FIELDS), field=unknown[0])
    for name in ("os", "arch"):
        if not isinstance(data.get(name), str):
            raise bad_request(f"{name} is required and must be a string", field=name)
    arm = data.get("arm")
    if isinstance(arm, int) and not isinstance(arm, bool):
        arm = str(arm)
    if arm is not None and not isinstance(arm, str):
        raise bad_request("arm must be 5, 6 or 7", field="arm")
    version = data.get("caddy_version")
    if version is not None and not isinstance(version, str):
        raise bad_request("caddy_version must be a string such as v2.8.4 or latest",
                          field="caddy_version")
    lists = {}
    for name in ("plugins", "replacements"):
        value = data.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad_request(f"{name} must be a list of strings like module@version", field=name)
        lists[name] = value
    if len(lists["plugins"]) > max_plugins:
        raise bad_request(f"{len(lists['plugins'])} plugins asked for; at most {max_plugins}",
                          field="plugins")
    try:
        return BuildRequest.create(
            os=data["os"], arch=data["arch"], arm=arm, caddy_version=version,
            plugins=lists["plugins"], replacements=lists["replacements"],
            max_plugins=max_plugins,
        )
    except SpecError as exc:
        raise bad_request(str(exc), field=exc.field) from None


def submit(service: BuildService, request: BuildRequest, **kwargs: Any) -> Any:
    """Submit through the service, turning resolution faults into HTTP errors."""
    try:
        return service.submit(request, **kwargs)
    except SpecError as exc:
        raise bad_request(str(exc), field=exc.field) from None
    except ModuleNotFound as exc:
        raise bad_request(str(exc)) from None
    except ProxyUnavailable as exc:
        raise ApiError(falcon.HTTP_502, f"the Go module proxy cannot be reached: {exc}") from None
    except (NoToolchain, CatalogUnavailable) as exc:
        raise unavailable(str(exc)) from None


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

    def submit_one(self, req: falcon.Request, request: BuildRequest) -> Any:
        """Submit one build of this HTTP request and register its callback_url."""
        submitted = submit(self.service, request)
        if self.callbacks is not None:
            self.callbacks.subscribe(req, submitted.key)
        return submitted

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = read_json(req, self.max_body_bytes)
        if self.callbacks is not None:
            self.callbacks.check(req, data)
        elif "callback_url" in data:
            raise bad_request("this server sends no webhooks", field="callback_url")
        if "platforms" in data:
            from kiln.api.groups import submit_group

            submit_group(self, req, resp, data)
            return
        request = request_from_json(data, max_plugins=self.max_plugins)
        submitted = self.submit_one(req, request)
        doc = build_document(submitted.build, queue=self.queue)
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
             "created_at": _iso(row["created_at"]), "finished_at": _iso(row["finished_at"]),
             "links": build_links(row["key"])}
            for row in self.queue.list_builds(limit=limit)
        ]}


def _load(queue: QueueManager, key: str) -> dict[str, Any]:
    if not KEY_PATTERN.match(key):
        raise not_found(f"{key!r} is not a build key (64 lowercase hex characters)")
    row = queue.get(key)
    if row is None:
        raise not_found(f"no build with key {key}")
    return row


class BuildResource:
    """``/api/builds/{key}``: a build's state."""

    def __init__(self, *, queue: QueueManager) -> None:
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = _load(self.queue, key)
        doc = build_document(row, queue=self.queue)
        doc["attempt_history"] = [
            {"number": a["number"], "worker_id": a["worker_id"], "outcome": a["outcome"],
             "started_at": _iso(a["started_at"]), "finished_at": _iso(a["finished_at"]),
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
                   queue: QueueManager, row: dict[str, Any], redirect: bool) -> None:
    """Answer with the artifact of a succeeded build: redirect, or stream with Range support."""
    if row["state"] != "succeeded" or not row["artifact_path"]:
        raise not_found(f"build {row['key']} is {row['state']}; the artifact exists once it "
                        "has succeeded")
    filename = BuildSpec.from_dict(row["spec"]).filename
    path, sha256, size = row["artifact_path"], row["artifact_sha256"], row["artifact_size"]
    etag = f'"{sha256}"'
    if req.method == "GET":
        queue.record_download(row["key"])
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
                       row=_load(self.queue, key), redirect=self.redirect)

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
