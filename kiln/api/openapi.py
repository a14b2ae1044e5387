"""The OpenAPI 3.1 description of Kiln's HTTP API, served at ``/openapi.json``.

Written by hand, next to the code it describes: every route of ``create_app`` must be in
``PATHS`` (tests/e2e/test_openapi.py lists the ones that are not), and Schemathesis checks
the running server's answers against it. Errors everywhere have the one JSON shape of
kiln/api/errors.py, and each operation lists every status it answers with, no ``default``: its
own, plus the three any route may give (401 for a key sent that is not valid, 500, and 503 when
the database cannot serve), so a status the document does not name is a bug.
Which operations need a key depends on ``auth.mode`` and ``metrics.public``; the document
says so for the server that serves it.
"""

from __future__ import annotations

from typing import Any

import falcon

from kiln.db.builds import STATES
from kiln.request.platforms import PLATFORMS

OSES = sorted({os_ for os_, _arch in PLATFORMS})
ARCHS = sorted({arch for _os, arch in PLATFORMS})

OPENAPI_VERSION = "3.1.0"
KEY_PATTERN = "^[0-9a-f]{64}$"

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """Return a reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> Schema:
    """Return a schema of ``kind`` or null."""
    return {"type": [kind, "null"], **extra}


def obj(properties: dict[str, Schema], required: list[str] | None = None, *,
        closed: bool = False) -> Schema:
    """Return an object schema; ``required`` defaults to every property."""
    schema: Schema = {"type": "object", "properties": properties,
                      "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


TIME = {"type": "string", "format": "date-time"}
TIME_OR_NULL = nullable("string", format="date-time")
STRINGS = {"type": "array", "items": {"type": "string"}}

SCHEMAS: dict[str, Schema] = {
    "Error": obj({
        "status_code": {"type": "integer", "minimum": 400, "maximum": 599},
        "error": obj({
            "message": {"type": "string", "minLength": 1},
            "id": {"type": "string", "description": "the request id (X-Request-Id)"},
            "field": {"type": "string", "description": "the input at fault"},
        }, ["message", "id"]),
    }),
    "Health": obj({"status": {"const": "ok"},
                   "checks": {"type": "object", "additionalProperties": {"const": "ok"},
                              "examples": [{"database": "ok", "schema": "ok", "store": "ok"}]}}),
    "Platform": obj({
        "os": {"enum": OSES, "examples": ["linux"]},
        "arch": {"enum": ARCHS, "examples": ["amd64"]},
        "arm": {"type": ["string", "integer", "null"], "examples": ["7"]},
    }, ["os", "arch"]),
    "BuildRequest": {
        "type": "object",
        "description": "One platform (os, arch, arm) or several (platforms), not both.",
        "properties": {
            "os": {"enum": OSES, "examples": ["linux"]},
            "arch": {"enum": ARCHS, "examples": ["amd64"],
                     "description": "not every os has every arch: GET /api/platforms"},
            "arm": {"type": ["string", "integer", "null"], "examples": ["7"]},
            "caddy_version": nullable("string", examples=["latest", "v2.8.4"]),
            "plugins": {**STRINGS, "description": "module[@version]"},
            "replacements": {**STRINGS, "description": "module[@version]=replacement"},
            "platforms": {"type": "array", "items": ref("Platform")},
            "callback_url": {"type": "string", "format": "uri",
                             "description": "POSTed to when each build finishes, signed "
                                            "with the secret returned as webhook.secret "
                                            "(needs api.public_url on the server)"},
        },
        "additionalProperties": False,
        "examples": [{"os": "linux", "arch": "amd64", "plugins": []}],
    },
    "Plugin": obj({"package": {"type": "string"}, "module": {"type": "string"},
                   "version": {"type": "string"}}),
    "Attempt": obj({
        "number": {"type": "integer"},
        "worker_id": nullable("string"),
        "outcome": {"enum": ["running", "succeeded", "failed", "lost", "preempted",
                             "cancelled"]},
        "started_at": TIME,
        "finished_at": TIME_OR_NULL,
        "error": nullable("string"),
    }),
    "Build": obj({
        "key": {"type": "string", "pattern": KEY_PATTERN},
        "state": {"enum": list(STATES)},
        "os": {"type": "string"},
        "arch": {"type": "string"},
        "arm": nullable("string"),
        "caddy_version": {"type": "string"},
        "plugins": {"type": "array", "items": ref("Plugin")},
        "go_version": nullable("string"),
        "sandbox": nullable("string"),
        "attempts": {"type": "integer", "minimum": 0},
        "max_attempts": {"type": "integer", "minimum": 1},
        "created_at": TIME,
        "started_at": TIME_OR_NULL,
        "finished_at": TIME_OR_NULL,
        "error": nullable("string"),
        "retryable": nullable("boolean"),
        "links": {"type": "object", "additionalProperties": {"type": "string"},
                  "required": ["self", "artifact"]},
        "duration_seconds": {"type": "number"},
        "queue_position": {"type": "integer", "minimum": 0,
                           "description": "builds a worker claims before this one"},
        "artifact": obj({"filename": {"type": "string"}, "size": {"type": "integer"},
                         "sha256": {"type": "string", "pattern": KEY_PATTERN}}),
        "attempt_history": {"type": "array", "items": ref("Attempt")},
    }, ["key", "state", "os", "arch", "caddy_version", "plugins", "attempts",
        "max_attempts", "created_at", "links"]),
    "Group": obj({
        "id": {"type": "string", "pattern": "^g_[0-9a-f]{32}$"},
        "state": {"enum": ["queued", "running", "succeeded", "failed"]},
        "builds": {"type": "array", "items": ref("Build")},
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    }),
    "Webhook": obj({
        "url": {"type": "string", "format": "uri"},
        "secret": {"type": "string", "minLength": 32,
                   "description": "only given here: each delivery for this request carries "
                                  "X-Kiln-Signature: sha256=<hex HMAC-SHA256 of the body "
                                  "with this secret>"},
    }),
    "Submitted": {
        "description": "A build, or a group of builds, and the request's webhook if it "
                       "named a callback_url",
        "allOf": [{"anyOf": [ref("Build"), ref("Group")]},
                  obj({"webhook": ref("Webhook")}, [])],
    },
    "BuildSummary": obj({
        "key": {"type": "string", "pattern": KEY_PATTERN},
        "state": {"enum": list(STATES)},
        "os": {"type": "string"},
        "arch": {"type": "string"},
        "arm": nullable("string"),
        "caddy_version": {"type": "string"},
        "plugins": STRINGS,
        "created_at": TIME,
        "finished_at": TIME_OR_NULL,
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    }),
    "BuildList": obj({"builds": {"type": "array", "items": ref("BuildSummary")}}),
    "AdminBuild": {"allOf": [ref("Build"), obj({
        "requested_by": {"oneOf": [{"type": "null"}, obj({
            "id": {"type": "string", "description": "a key id, or addr:<client address>"},
            "key_name": nullable("string"),
            "anonymous": {"type": "boolean"},
        })]},
        "priority": {"type": "integer"},
        "downloads": {"type": "integer", "minimum": 0},
        "worker_id": nullable("string"),
    })]},
    "AdminBuildList": obj({
        "builds": {"type": "array", "items": ref("AdminBuild")},
        "next_before": {**TIME, "description": "pass as ?before= for the next page"},
    }, ["builds"]),
    "Worker": obj({
        "id": {"type": "string"},
        "hostname": {"type": "string"},
        "pid": {"type": "integer"},
        "state": {"enum": ["active", "draining", "gone"]},
        "concurrency": {"type": "integer"},
        "sandbox": {"type": "string"},
        "running": {"type": "integer", "minimum": 0},
        "started_at": TIME,
        "heartbeat_at": TIME,
        "stopped_at": TIME_OR_NULL,
    }),
    "WorkerList": obj({"workers": {"type": "array", "items": ref("Worker")}}),
    "SigningKey": obj({
        "algorithm": {"type": "string", "examples": ["ed25519"]},
        "key_id": {"type": "string"},
        "public_key": {"type": "string", "description": "base64 of the raw key"},
        "public_key_pem": {"type": "string"},
        "created_at": TIME,
        "last_used_at": TIME,
    }),
    "SigningKeys": {"allOf": [ref("SigningKey"), obj({
        "keys": {"type": "array", "items": ref("SigningKey"),
                 "description": "the current key first, then earlier ones"}})]},
    "ArtifactLookup": obj({
        "sha256": {"type": "string", "pattern": KEY_PATTERN},
        "builds": {"type": "array", "items": obj({
            "key": {"type": "string", "pattern": KEY_PATTERN},
            "filename": nullable("string"),
            "key_id": nullable("string"),
            "finished_at": TIME_OR_NULL,
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        })},
    }),
    "Platforms": obj({
        "platforms": {"type": "array", "items": obj({
            "os": {"type": "string"}, "arch": {"type": "string"},
            "arm": {"type": "array", "items": {"type": ["string", "integer"]}}})},
        "default_arm": {"type": ["string", "integer"]},
    }),
    "PluginVersions": obj({"path": {"type": "string"}, "module": {"type": "string"},
                           "latest": {"type": "string"}, "versions": STRINGS}),
    "Packages": obj({
        "status_code": {"const": 200},
        "result": {"type": "array", "items": obj({
            "id": {"type": "string"}, "path": {"type": "string"}, "repo": {"type": "string"},
            "downloads": {"type": "integer"}, "listed": {"type": "boolean"},
            "available": {"type": "boolean"}, "published": nullable("string"),
            "updated": nullable("string"),
            "modules": {"type": "array", "items": obj({
                "name": {"type": "string"}, "docs": {"type": "string"},
                "package": {"type": "string"}, "repo": {"type": "string"}})},
        })},
    }),
    "Versions": obj({"status_code": {"const": 200}, "result": obj({
        "module": {"type": "string"}, "latest": {"type": "string"}, "versions": STRINGS})}),
    "Waiting": obj({"status_code": {"const": 307}, "waiting": {"const": True},
                    "redirects_left": {"type": "integer", "minimum": 0}}),
    "BuildEvent": {
        "type": "object",
        "description": "One Server-Sent Event; data is JSON: the state, the step, a log "
                       "line, or (result) the build document, after which the stream ends",
        "properties": {
            "event": {"enum": ["state", "step", "log", "result"]},
            "id": {"type": "string", "description": "resume with Last-Event-ID"},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "retry": {"type": "integer"},
        },
    },
    "DsseEnvelope": obj({
        "payloadType": {"type": "string"},
        "payload": {"type": "string", "contentEncoding": "base64"},
        "signatures": {"type": "array", "items": {"type": "object"}},
    }),
}

# -- pieces of operations -------------------------------------------------------------------


def json_response(description: str, schema: Schema, headers: dict[str, Any] | None = None
                  ) -> Schema:
    """Return a response with a JSON body."""
    response: Schema = {"description": description,
                        "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def error(description: str, headers: dict[str, Any] | None = None) -> Schema:
    """Return an error response in Kiln's JSON shape."""
    return json_response(description, ref("Error"), headers)


def body(description: str, media: dict[str, Schema]) -> Schema:
    """Return a response whose body is in one of ``media``'s types."""
    return {"description": description,
            "content": {kind: {"schema": schema} for kind, schema in media.items()}}


BINARY = {"type": "string", "format": "binary"}
TEXT = {"type": "string"}
STRING_HEADER = {"schema": {"type": "string"}}
UNAUTHORIZED = error("no key, or a wrong or revoked one",
                     {"WWW-Authenticate": STRING_HEADER})
FORBIDDEN = error("the key is valid but may not do this")
NOT_FOUND = error("no such build (or file)")
TOO_MANY = error("over the quota of new builds (or requests) for this window",
                 {"Retry-After": {"schema": {"type": "integer"},
                                  "description": "seconds until the next window"}})
#: what any route may answer: a key is checked wherever one is sent (kiln/api/auth.py), and
#: every request may meet a bug or a database that cannot serve (kiln/api/errors.py)
EVERY_ROUTE = {
    "401": UNAUTHORIZED,
    # refused by gunicorn before the app reads it (kiln/api/gunicorn_worker.py)
    "414": error("the URL is longer than the server reads (4094 bytes with the request line)"),
    "431": error("the headers are larger than the server reads (over 100, or one over 8190 "
                 "bytes)"),
    "500": error("internal error: the message gives the id to report to the operator"),
    "503": error("the database cannot serve now; try again shortly",
                 {"Retry-After": {"schema": {"type": "integer"},
                                  "description": "seconds to wait before asking again"}}),
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                               "description": "seconds to wait before asking again"}}


def key_param(name: str = "key", pattern: str = KEY_PATTERN, description: str = "") -> Schema:
    """Return a path parameter."""
    return {"name": name, "in": "path", "required": True,
            "description": description or "the build key (sha256 of its canonical spec)",
            "schema": {"type": "string", "pattern": pattern}}


def query(name: str, schema: Schema, description: str = "", required: bool = False) -> Schema:
    """Return a query parameter."""
    param: Schema = {"name": name, "in": "query", "schema": schema, "required": required}
    if description:
        param["description"] = description
    return param


def operation(op_id: str, summary: str, responses: dict[str, Schema], *,
              params: list[Schema] | None = None, request: Schema | None = None,
              auth: str = "public", tags: list[str] | None = None) -> Schema:
    """Return an operation; ``auth`` is public, build, key or admin (see kiln/api/auth.py)."""
    op: Schema = {"operationId": op_id, "summary": summary, "tags": tags or ["builds"],
                  "responses": dict(sorted({**EVERY_ROUTE, **responses}.items()))}
    if params:
        op["parameters"] = params
    if request is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": request}}}
    op["x-kiln-auth"] = auth
    return op


DOWNLOAD_PARAMS = [
    query("os", {"type": "string"}, "GOOS", required=True),
    query("arch", {"type": "string"}, "GOARCH", required=True),
    query("arm", {"type": "string"}, "GOARM (5, 6, 7)"),
    query("version", {"type": "string"}, "Caddy's version (default: latest)"),
    query("caddy_version", {"type": "string"}, "Caddy's version (another name)"),
    {**query("p", {"type": "array", "items": {"type": "string"}}, "plugin module[@version]"),
     "style": "form", "explode": True},
    query("idempotency", {"type": "string"}, "ignored (the website's cache buster)"),
    query("kiln_wait", {"type": "string"}, "wait redirects followed so far"),
]


def _download(op_id: str, summary: str, head: bool) -> Schema:
    ok = ("held until built: 200 with the binary" if not head
          else "held until built: 200 with a Location that serves the binary")
    return operation(op_id, summary, {
        "200": body(ok, {"application/octet-stream": BINARY}),
        "302": {"description": "redirect to the artifact store (storage.serve: redirect)"},
        "307": json_response("still building: come back to the same URL (api.wait_redirects)",
                             ref("Waiting")),
        "400": error("not a valid request, or the build failed"),
        "401": UNAUTHORIZED,
        "429": TOO_MANY,
        "502": error("the module proxy or the build workers cannot be reached"),
        "503": error("the build is not done and this client (api.max_held_per_client) or "
                     "this API process (api.max_held) holds as many requests as allowed (the "
                     "build goes on; the message names the cap), or the database cannot serve, "
                     "or the build was cancelled, or the module proxy was slow", RETRY_AFTER),
        "504": error("still building after api.max_wait; ask again later"),
    }, params=DOWNLOAD_PARAMS, auth="build", tags=["caddyserver.com"])


def _paths() -> dict[str, dict[str, Schema]]:
    build = [key_param()]
    artifact_ok = body("the binary (Content-Disposition names it; ETag is its sha256)",
                       {"application/octet-stream": BINARY})
    artifact = {
        "200": artifact_ok,
        "206": body("the requested range", {"application/octet-stream": BINARY}),
        "302": {"description": "redirect to the artifact store (storage.serve: redirect)"},
        "304": {"description": "not modified (If-None-Match)"},
        "404": NOT_FOUND,
        "416": error("the range lies outside the artifact"),
    }
    sig = {"200": body("the raw 64-byte ed25519 signature of the binary",
                       {"application/octet-stream": BINARY}), "404": NOT_FOUND}
    checksum = {"200": body("`<sha256>  <filename>` (sha256sum's format)",
                            {"text/plain": TEXT}), "404": NOT_FOUND}
    return {
        "/healthz": {"get": operation("health", "The API process is up and reaches "
                                      "PostgreSQL (with Kiln's schema) and its store",
                                      {"200": json_response("healthy", ref("Health")),
                                       "503": error("the database, its schema or the store "
                                                    "cannot be used: the message says which "
                                                    "and why")},
                                      tags=["service"])},
        "/api/builds": {
            "get": operation("listRecentBuilds", "The most recent builds (never who asked)", {
                "200": json_response("recent builds", ref("BuildList")),
                "400": error("a bad parameter"),
            }, params=[query("limit", {"type": "integer", "minimum": 1, "maximum": 100})]),
            "post": operation("submitBuild", "Ask for a build (or one per platform)", {
                "200": json_response("already built", ref("Submitted")),
                "202": json_response("queued, or joining a build in progress",
                                     ref("Submitted"), {"Location": STRING_HEADER}),
                "400": error("not a valid request; the message says what to fix"),
                "401": UNAUTHORIZED,
                "413": error("the body is too large"),
                "429": TOO_MANY,
                "502": error("the Go module proxy cannot be reached"),
                "503": error("no worker yet, or the database or module proxy is slow", RETRY_AFTER),
            }, request=ref("BuildRequest"), auth="build"),
        },
        "/api/builds/{key}": {
            "get": operation("getBuild", "A build's state, versions, attempts and timings", {
                "200": json_response("the build", ref("Build")),
                "404": NOT_FOUND,
            }, params=build),
            "delete": operation("cancelBuild", "Cancel a queued or running build (the key "
                                "that asked for it, or an admin key)", {
                "200": json_response("cancelled", ref("Build")),
                "401": UNAUTHORIZED,
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "409": error("the build has already succeeded or failed"),
            }, params=build, auth="key"),
        },
        "/api/builds/{key}/artifact": {"get": operation(
            "getArtifact", "The binary (Range requests welcome)", artifact, params=build,
            tags=["artifacts"]), "head": operation(
            "headArtifact", "The binary's headers", artifact, params=build,
            tags=["artifacts"])},
        "/api/builds/{key}/artifact.sig": {
            "get": operation("getSignature", "The binary's ed25519 signature", sig,
                             params=build, tags=["artifacts"]),
            "head": operation("headSignature", "The signature's headers", sig, params=build,
                              tags=["artifacts"])},
        "/api/builds/{key}/artifact.sha256": {
            "get": operation("getChecksum", "The binary's sha256, sha256sum-style", checksum,
                             params=build, tags=["artifacts"]),
            "head": operation("headChecksum", "The checksum's headers", checksum,
                              params=build, tags=["artifacts"])},
        "/api/builds/{key}/provenance": {"get": operation(
            "getProvenance", "The signed in-toto SLSA provenance (a DSSE envelope)", {
                "200": body("the envelope", {"application/vnd.dsse.envelope.v1+json":
                                             ref("DsseEnvelope")}),
                "404": NOT_FOUND}, params=build, tags=["artifacts"])},
        "/api/builds/{key}/sbom": {"get": operation(
            "getSbom", "The CycloneDX SBOM of the binary", {
                "200": body("CycloneDX 1.5 JSON", {"application/vnd.cyclonedx+json":
                                                   {"type": "object"}}),
                "404": NOT_FOUND}, params=build, tags=["artifacts"])},
        "/api/builds/{key}/log": {"get": operation(
            "getBuildLog", "The build's log so far, as plain text", {
                "200": body("the log", {"text/plain": TEXT}), "404": NOT_FOUND},
            params=build, tags=["logs"])},
        "/api/builds/{key}/events": {"get": operation(
            "watchBuild", "The build live: state, step, log and result events (SSE)", {
                "200": body("Server-Sent Events until the result, or until "
                            "api.max_stream_seconds (then a comment says to reconnect "
                            "with Last-Event-ID)",
                            {"text/event-stream": ref("BuildEvent")}),
                "204": {"description": "the build finished and the client saw it all"},
                "404": NOT_FOUND,
                "503": error("this client (api.max_held_per_client) or this API process "
                             "(api.max_held) holds as many live streams and held downloads "
                             "as allowed; the message names the cap", RETRY_AFTER),
            }, params=[*build, query("last_event_id", {"type": "string"},
                                     "resume after this event id (or Last-Event-ID)")],
            tags=["logs"])},
        "/api/artifacts/{sha256}": {"get": operation(
            "findArtifact", "The succeeded builds that produced a file with this sha256", {
                "200": json_response("the builds", ref("ArtifactLookup")),
                "404": NOT_FOUND,
            }, params=[key_param("sha256", "^.+$", "hex (or base64) sha256 of the file")],
            tags=["artifacts"])},
        "/api/groups/{gid}": {"get": operation(
            "getGroup", "The builds of a several-platform request", {
                "200": json_response("the group", ref("Group")), "404": NOT_FOUND,
            }, params=[key_param("gid", "^.+$", "the group id (g_ and 32 hex digits)")])},
        "/api/signing-key": {"get": operation(
            "getSigningKey", "The public key artifacts are signed with", {
                "200": body("the current key and every earlier one (?format=pem: the PEM)",
                            {"application/json": ref("SigningKeys"),
                             "application/x-pem-file": TEXT}),
                "404": error("no signing key (yet), or none with that key_id"),
            }, params=[query("key_id", {"type": "string"}, "a key id or its prefix"),
                       query("format", {"enum": ["pem", "json"]})], tags=["artifacts"])},
        "/api/platforms": {"get": operation(
            "listPlatforms", "Every os/arch Kiln builds", {
                "200": json_response("the platforms", ref("Platforms"))}, tags=["ui"])},
        "/api/plugin-versions": {"get": operation(
            "listPluginVersions", "A plugin's module and versions, newest first", {
                "200": json_response("the versions", ref("PluginVersions")),
                "400": error("no or a malformed path, or over build.max_proxy_calls look-ups"),
                "404": error("no such module"),
                "502": error("the Go module proxy cannot be reached"),
            }, params=[query("path", {"type": "string"}, "the plugin's package path",
                             required=True)], tags=["ui"])},
        "/api/download": {"get": _download("download", "caddyserver.com's download: held "
                                           "until the binary exists", head=False),
                          "head": _download("headDownload", "The website's HEAD before it "
                                            "navigates", head=True)},
        "/api/compat": {"get": _download("compat", "The same as /api/download", head=False),
                        "head": _download("headCompat", "The same as HEAD /api/download",
                                          head=True)},
        "/api/packages": {"get": operation(
            "listPackages", "The plugin catalog, in caddyserver.com's shape", {
                "200": json_response("the packages", ref("Packages")),
                "503": error("the catalog cannot be read now")}, tags=["caddyserver.com"])},
        "/api/versions": {"get": operation(
            "listVersions", "A module's versions (Caddy's by default), newest first", {
                "200": json_response("the versions", ref("Versions")),
                "400": error("a malformed module path, or over build.max_proxy_calls look-ups"),
                "404": error("no such module"),
                "502": error("the Go module proxy cannot be reached"),
            }, params=[query("module", {"type": "string"})], tags=["caddyserver.com"])},
        "/api/admin/builds": {"get": operation(
            "adminListBuilds", "Every build, newest first, with who asked for it", {
                "200": json_response("the builds", ref("AdminBuildList")),
                "400": error("a bad filter"),
                "401": UNAUTHORIZED, "403": FORBIDDEN,
            }, params=[query("state", {"enum": list(STATES)}),
                       query("requested_by", {"type": "string"},
                             "a key id, or addr:<client address>"),
                       query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                       query("before", {"type": "string", "format": "date-time"},
                             "only builds created before this time (paging)")],
            auth="admin", tags=["admin"])},
        "/api/admin/builds/{key}/rebuild": {"post": operation(
            "adminRebuild", "Build a finished build again", {
                "202": json_response("queued again", ref("AdminBuild"),
                                     {"Location": STRING_HEADER}),
                "401": UNAUTHORIZED, "403": FORBIDDEN, "404": NOT_FOUND,
                "409": error("the build is queued or running"),
            }, params=build, auth="admin", tags=["admin"])},
        "/api/admin/builds/{key}/artifact": {"delete": operation(
            "adminDeleteArtifact", "Delete a build's stored files (asking again rebuilds it)", {
                "200": json_response("deleted", ref("AdminBuild")),
                "401": UNAUTHORIZED, "403": FORBIDDEN, "404": NOT_FOUND,
                "409": error("the build has no stored artifact"),
            }, params=build, auth="admin", tags=["admin"])},
        "/api/admin/workers": {"get": operation(
            "adminListWorkers", "Every worker that registered, and what it runs", {
                "200": json_response("the workers", ref("WorkerList")),
                "401": UNAUTHORIZED, "403": FORBIDDEN,
            }, auth="admin", tags=["admin"])},
        "/": {"get": operation("ui", "The web UI", {
            "200": body("the page", {"text/html": TEXT}),
            "304": {"description": "not modified"}}, tags=["ui"])},
        "/builds/{key}": {"get": operation("uiBuild", "The web UI's page of one build", {
            "200": body("the page", {"text/html": TEXT}),
            "304": {"description": "not modified"}},
            params=[key_param("key", "^.+$")], tags=["ui"])},
        "/static/{name}": {"get": operation("uiAsset", "The web UI's scripts and styles", {
            "200": body("the file", {"text/css": TEXT, "text/javascript": TEXT,
                                     "image/svg+xml": TEXT, "image/png": BINARY}),
            "304": {"description": "not modified"},
            "404": NOT_FOUND}, params=[key_param("name", "^.+$", "a file name")],
            tags=["ui"])},
        "/metrics": {"get": operation("metrics", "Prometheus metrics of the whole deployment", {
            "200": body("text exposition format", {"text/plain": TEXT}),
            "401": UNAUTHORIZED, "403": FORBIDDEN}, tags=["service"])},
        "/openapi.json": {"get": operation("openapi", "This document", {
            "200": json_response("OpenAPI 3.1", {"type": "object"})}, tags=["service"])},
    }


def openapi_spec(*, auth_mode: str = "open", metrics_public: bool = True) -> dict[str, Any]:
    """Return the OpenAPI document of a server with this auth mode."""
    paths = _paths()
    if not metrics_public:
        paths["/metrics"]["get"]["x-kiln-auth"] = "admin"
    for methods in paths.values():
        for op in methods.values():
            need = op["x-kiln-auth"]
            if need in ("key", "admin") or (need == "build" and auth_mode == "keys"):
                op["security"] = [{"bearer": []}]
            elif need == "build":
                op["security"] = [{}, {"bearer": []}]  # a key is optional here
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Kiln",
            "version": "1",
            "description": "Custom Caddy builds on demand. Errors are always "
                           '{"status_code": N, "error": {"message", "id", "field"?}}.',
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "an API key made with `kiln keys create`"}},
        },
    }


class OpenApiResource:
    """``/openapi.json``: this server's API description."""

    def __init__(self, *, auth_mode: str = "open", metrics_public: bool = True) -> None:
        self.document = openapi_spec(auth_mode=auth_mode, metrics_public=metrics_public)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.document
        resp.set_header("Cache-Control", "public, max-age=300")
