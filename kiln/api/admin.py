"""Control over builds: cancel (the key that asked, or an admin), and admin-only routes.

``DELETE /api/builds/{key}`` cancels; under ``/api/admin/`` (admin keys only): every build
with who asked for it, a forced rebuild, the workers, and deleting an artifact.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import falcon

from kiln.api.auth import ADMIN, KEY, forbidden, principal_of
from kiln.api.builds import BuildResource
from kiln.api.documents import build_document, load_build
from kiln.api.errors import ApiError, bad_request, unavailable
from kiln.artifacts.store import ArtifactStore, StorageError
from kiln.db.builds import STATES, Build, QueueManager

#: builds one listing returns by default, and at most
LIST_LIMIT = 50
MAX_LIST_LIMIT = 500
#: longer than any key id or addr:<IPv6 address> a build records as its requester
MAX_REQUESTER_CHARS = 200


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _utc(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _time_param(req: falcon.Request, name: str) -> dt.datetime | None:
    text = req.get_param(name)
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise bad_request(f"{name} must be an ISO 8601 time such as 2024-08-01T12:00:00Z",
                          field=name) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def conflict(message: str) -> ApiError:
    """Return a 409: the build is not in a state this action applies to."""
    return ApiError(falcon.HTTP_409, message)


def cancel_build(queue: QueueManager, req: falcon.Request, key: str) -> Build:
    """Cancel ``key`` for whoever sent ``req``; return the build's row afterwards."""
    principal = principal_of(req)
    row = load_build(queue, key)
    if not principal.is_admin and row.requested_by != principal.requester:
        raise forbidden(f"{principal.describe()} did not ask for build {key}: only the key "
                        "that asked for it, or an admin key, may cancel it")
    if row.state in ("queued", "running"):
        queue.cancel(key, reason=f"cancelled by {principal.describe()}")
        row = load_build(queue, key)
    if row.state != "cancelled":
        raise conflict(f"build {key} has {row.state}; only a queued or running build "
                       "can be cancelled")
    return row


class CancellableBuildResource(BuildResource):
    """``/api/builds/{key}``: a build's state (GET), and cancelling it (DELETE)."""

    auth = {"DELETE": KEY}

    def on_delete(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = cancel_build(self.queue, req, key)
        resp.media = build_document(row, queue=self.queue)


def admin_build_document(row: Build, *, queue: QueueManager,
                         key_name: str | None = None) -> dict[str, Any]:
    """Return a build's public document plus what only admins see (``key_name``: the name
    of the key that asked for it, when the listing read it)."""
    doc = build_document(row, queue=queue)
    requester = row.requested_by
    doc["requested_by"] = {
        "id": requester,
        "key_name": key_name,
        "anonymous": bool(requester and requester.startswith("addr:")),
    } if requester else None
    doc["priority"] = row.priority
    doc["downloads"] = row.downloads
    doc["worker_id"] = row.worker_id
    return doc


class AdminBuildsResource:
    """``/api/admin/builds``: every build, newest first, with who asked."""

    auth = {"GET": ADMIN}

    def __init__(self, *, queue: QueueManager) -> None:
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = req.get_param("state")
        if state is not None and state not in STATES:
            raise bad_request(f"state must be one of {', '.join(STATES)}", field="state")
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_LIST_LIMIT,
                                     default=LIST_LIMIT)
        before = _time_param(req, "before")
        requested_by = req.get_param("requested_by")
        # a requester is a key id or addr:<address>: printable, and PostgreSQL's text cannot
        # hold a NUL at all
        if requested_by is not None and (len(requested_by) > MAX_REQUESTER_CHARS
                                         or not requested_by.isprintable()):
            raise bad_request("requested_by must be a key id or addr:<client address>, as a "
                              "build's requested_by.id shows it", field="requested_by")
        rows = self.queue.admin_list_builds(limit=limit, state=state,
                                            requested_by=requested_by, before=before)
        builds = [admin_build_document(Build.from_row(r), queue=self.queue,
                                       key_name=r.get("key_name")) for r in rows]
        doc: dict[str, Any] = {"builds": builds}
        if len(rows) == limit:
            doc["next_before"] = _utc(rows[-1]["created_at"])
        resp.media = doc


class AdminRebuildResource:
    """``/api/admin/builds/{key}/rebuild``: build a finished build again."""

    auth = {"POST": ADMIN}

    def __init__(self, *, queue: QueueManager) -> None:
        self.queue = queue

    def on_post(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = load_build(self.queue, key)
        if not self.queue.force_rebuild(key):
            raise conflict(f"build {key} is {row.state}; only a finished build can be "
                           "rebuilt")
        resp.status = falcon.HTTP_202
        resp.media = admin_build_document(load_build(self.queue, key), queue=self.queue)
        resp.location = resp.media["links"]["self"]


class AdminArtifactResource:
    """``/api/admin/builds/{key}/artifact``: delete a build's stored files."""

    auth = {"DELETE": ADMIN}

    def __init__(self, *, queue: QueueManager, store: ArtifactStore) -> None:
        self.queue = queue
        self.store = store

    def on_delete(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = load_build(self.queue, key)
        # detach first: from now on nobody is sent to the files being deleted
        if not self.queue.forget_artifact(key):
            raise conflict(f"build {key} is {row.state} and has no stored artifact")
        try:
            self.store.delete(key)
        except StorageError as exc:
            raise unavailable(f"the artifact was detached but its files cannot be deleted "
                              f"now ({exc}); the storage collector will remove them") from None
        resp.media = admin_build_document(load_build(self.queue, key), queue=self.queue)


class AdminWorkersResource:
    """``/api/admin/workers``: every worker that registered, and what it runs."""

    auth = {"GET": ADMIN}

    def __init__(self, *, queue: QueueManager) -> None:
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"workers": [
            {"id": w["id"], "hostname": w["hostname"], "pid": w["pid"], "state": w["state"],
             "concurrency": w["concurrency"], "sandbox": w["sandbox"],
             "running": int(w["running"]), "started_at": _iso(w["started_at"]),
             "heartbeat_at": _iso(w["heartbeat_at"]), "stopped_at": _iso(w["stopped_at"])}
            for w in self.queue.list_workers()
        ]}


def add_routes(app: falcon.App, *, queue: QueueManager, store: ArtifactStore) -> None:
    """Add the admin routes to ``app``."""
    app.add_route("/api/admin/builds", AdminBuildsResource(queue=queue))
    app.add_route("/api/admin/builds/{key}/rebuild", AdminRebuildResource(queue=queue))
    app.add_route("/api/admin/builds/{key}/artifact",
                  AdminArtifactResource(queue=queue, store=store))
    app.add_route("/api/admin/workers", AdminWorkersResource(queue=queue))
