"""What the API says of a build, and how it reads one: documents, links, request bodies.

Shared by every resource that shows or takes builds (builds, groups, compat, events,
admin, attestations), so none of them imports another for it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import falcon

from kiln.api.errors import ApiError, bad_request, not_found
from kiln.db.builds import Build, QueueManager
from kiln.errors import SpecError
from kiln.request.spec import BuildRequest, BuildSpec

KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
BUILD_FIELDS = ("os", "arch", "arm", "caddy_version", "plugins", "replacements",
                # several platforms and webhooks: kiln/api/groups.py
                "platforms", "callback_url")


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def build_links(key: str) -> dict[str, str]:
    """Return the URLs (relative to the server) of a build's resources."""
    base = f"/api/builds/{key}"
    return {"self": base, "artifact": f"{base}/artifact", "log": f"{base}/log",
            "events": f"{base}/events",
            # attestations: kiln/api/attest.py
            "signature": f"{base}/artifact.sig", "checksum": f"{base}/artifact.sha256",
            "provenance": f"{base}/provenance", "sbom": f"{base}/sbom"}


def build_document(row: Build, *, queue: QueueManager | None = None) -> dict[str, Any]:
    """Return the public JSON form of a build row."""
    spec = row.spec
    doc: dict[str, Any] = {
        "key": row.key,
        "state": row.state,
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
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "error": row.error,
        "retryable": row.error_kind == "retryable" if row.error else None,
        "links": build_links(row.key),
    }
    if row.started_at and row.finished_at:
        doc["duration_seconds"] = round(
            (row.finished_at - row.started_at).total_seconds(), 3)
    if row.state == "queued" and queue is not None:
        doc["queue_position"] = queue.queue_position(row.key)
    if row.state == "succeeded" and row.artifact_path:
        doc["artifact"] = {
            "filename": BuildSpec.from_dict(spec).filename,
            "size": row.artifact_size,
            "sha256": row.artifact_sha256,
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
    except RecursionError:
        # json's decoder recurses once per array or object it opens
        raise bad_request("the body nests too deeply; a build request is a flat JSON "
                          "object of strings and lists of strings") from None
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


def load_build(queue: QueueManager, key: str) -> Build:
    """Return the build row of ``key``, or a 404 saying why there is none."""
    if not KEY_PATTERN.match(key):
        raise not_found(f"{key!r} is not a build key (64 lowercase hex characters)")
    row = queue.get(key)
    if row is None:
        raise not_found(f"no build with key {key}")
    return row
