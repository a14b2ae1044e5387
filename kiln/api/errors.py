"""HTTP errors in one JSON shape, the one caddyserver.com's clients already decode.

``{"status_code": N, "error": {"message": "...", "id": "<request id>"}}`` (plus ``field``
when one input is at fault). The id is also in Kiln's log line for the request.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import falcon

from kiln.api.service import NoToolchain
from kiln.errors import KilnError, SpecError
from kiln.request.catalog import CatalogUnavailable
from kiln.resolve.budget import ProxyCallsExceeded, ProxyDeadlineExceeded
from kiln.resolve.proxy import ModuleNotFound, ProxyUnavailable

log = logging.getLogger("kiln.api")

REQUEST_ID_HEADER = "X-Request-Id"


def request_id(req: falcon.Request) -> str:
    """Return the id of this request: the client's X-Request-Id if sane, else a new uuid."""
    rid = req.context.get("request_id")
    if rid:
        return str(rid)
    given = req.get_header(REQUEST_ID_HEADER) or ""
    rid = given if 0 < len(given) <= 128 and given.replace("-", "").isalnum() else str(uuid.uuid4())
    req.context.request_id = rid
    return rid


class ApiError(falcon.HTTPError):
    """An error with a message that tells the client what to fix."""

    def __init__(self, status: str | int, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, description=message, headers=headers)
        self.message = message
        self.field = field


def bad_request(message: str, *, field: str | None = None) -> ApiError:
    """Return a 400 error."""
    return ApiError(falcon.HTTP_400, message, field=field)


def not_found(message: str) -> ApiError:
    """Return a 404 error."""
    return ApiError(falcon.HTTP_404, message)


def unavailable(message: str) -> ApiError:
    """Return a 503 error (database or workers cannot serve now)."""
    return ApiError(falcon.HTTP_503, message, headers={"Retry-After": "5"})


def error_body(status_code: int, message: str, rid: str, field: str | None = None) -> dict[str, Any]:
    """Return the JSON error document."""
    error: dict[str, Any] = {"message": message, "id": rid}
    if field:
        error["field"] = field
    return {"status_code": status_code, "error": error}


def _falcon_message(req: falcon.Request, exc: falcon.HTTPError) -> str | None:
    """Say what is wrong for the errors Falcon raises itself, which carry only a title."""
    if isinstance(exc, falcon.HTTPRouteNotFound):
        return "no such route; /openapi.json lists the routes of this API"
    if isinstance(exc, falcon.HTTPMethodNotAllowed):
        allowed = dict(exc.headers or {}).get("Allow", "")
        return f"this route does not take {req.method}; it takes {allowed}"
    return None


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Render every HTTP error as Kiln's JSON error document."""
    rid = request_id(req)
    message = (getattr(exc, "message", None) or exc.description or _falcon_message(req, exc)
               or exc.title or "error")
    field = getattr(exc, "field", None)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(error_body(exc.status_code, message, rid, field))
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    log.log(level, "%s %s -> %d: %s (request %s)", req.method, req.path, exc.status_code,
            message, rid,
            extra={"request_id": rid, "status": exc.status_code})


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception,
                      params: dict[str, Any]) -> None:
    """Turn an unexpected exception into a logged 500 (database faults into 503)."""
    import psycopg
    import psycopg_pool

    if isinstance(ex, falcon.HTTPError):
        raise ex
    if isinstance(ex, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        raise unavailable("the database is unreachable; try again shortly") from ex
    log.exception("unhandled error on %s %s", req.method, req.path,
                  extra={"request_id": request_id(req)})
    raise ApiError(falcon.HTTP_500, "internal error; report the id to the operator") from ex


#: the HTTP status of each of Kiln's errors where it reaches the API edge (the one place
#: errors meet HTTP; a resource that means something else by one, such as a 404 for a
#: module looked up by path, catches it itself). QuotaExceeded has its own handler (429
#: with Retry-After, kiln/api/auth.py).
STATUSES: tuple[tuple[type[KilnError], str, str], ...] = (
    (SpecError, falcon.HTTP_400, ""),
    (ModuleNotFound, falcon.HTTP_400, ""),
    (ProxyUnavailable, falcon.HTTP_502, "the Go module proxy cannot be reached: "),
    # one request's share of module-proxy look-ups (build.max_proxy_calls): ask for less
    (ProxyCallsExceeded, falcon.HTTP_400, ""),
    # the proxy is slow now (build.proxy_deadline): retryable
    (ProxyDeadlineExceeded, falcon.HTTP_503, ""),
    (NoToolchain, falcon.HTTP_503, ""),
    (CatalogUnavailable, falcon.HTTP_503, ""),
)


def http_error(exc: KilnError) -> ApiError | None:
    """Return the HTTP error ``exc`` stands for at the edge, or None if it has no status."""
    for kind, status, prefix in STATUSES:
        if isinstance(exc, kind):
            field = exc.field if isinstance(exc, SpecError) else None
            headers = {"Retry-After": "5"} if status == falcon.HTTP_503 else None
            return ApiError(status, f"{prefix}{exc}", field=field, headers=headers)
    return None


def handle_kiln_error(req: falcon.Request, resp: falcon.Response, ex: KilnError,
                      params: dict[str, Any]) -> None:
    """Answer one of Kiln's errors that a resource let through with its status (else 500)."""
    error = http_error(ex)
    if error is None:
        handle_unexpected(req, resp, ex, params)
        return
    raise error from ex

