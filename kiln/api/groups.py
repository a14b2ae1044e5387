"""Extras of ``POST /api/builds``: several platforms in one request, and callback URLs.

``{"platforms": [{"os": "linux", "arch": "amd64"}, {"os": "darwin", "arch": "arm64"}],
"plugins": [...]}`` (instead of os/arch/arm) queues one build per platform, all with the
same Caddy version and plugins, and answers with a group document; ``GET /api/groups/{id}``
shows it again with each build's current state. ``callback_url`` (with one platform or
several) is POSTed when each build finishes (kiln/janitor/webhooks.py), signed with a secret
made for that request and returned in the answer (``webhook``), with links at
``api.public_url``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

import falcon

from kiln.api.documents import build_document, request_from_json
from kiln.api.errors import ApiError, bad_request, not_found
from kiln.api.principal import Principal
from kiln.db.builds import QueueManager
from kiln.db.groups import GroupManager
from kiln.db.webhooks import WebhookManager
from kiln.request.callbacks import (
    AddressResolver,
    CallbackRefused,
    Webhook,
    check_callback_url,
    new_secret,
)
from kiln.request.spec import BuildRequest

PLATFORM_FIELDS = ("os", "arch", "arm")


class Callbacks:
    """Check a request's ``callback_url`` before queueing; subscribe it to each build after.

    Links in a delivery are made from ``public_url`` only (``api.public_url``): a link taken
    from the request's Host header would let anyone have Kiln send links to any host. Without
    it the server takes no callback_url (a 400 telling the operator what to set), rather
    than refusing to start: webhooks need no switch, and a server nobody asks for callbacks
    needs no public URL.
    """

    def __init__(self, *, webhooks: WebhookManager, allow_private: bool, public_url: str,
                 resolve: AddressResolver = socket.getaddrinfo,
                 token: Callable[[], str] = new_secret) -> None:
        self.webhooks = webhooks
        self.allow_private = allow_private
        self.public_url = public_url.rstrip("/")
        self.resolve = resolve
        self.token = token

    def check(self, data: dict[str, Any]) -> Webhook | None:
        """Return the request's callback with a new secret (None if it names none); 400 if
        it may not be called."""
        url = data.get("callback_url")
        if url is None:
            return None
        if not self.public_url:
            raise bad_request("this server sends no webhooks until its operator sets "
                              "api.public_url (the links in a webhook are made from it)",
                              field="callback_url")
        try:
            url = check_callback_url(url, allow_private=self.allow_private,
                                     resolve=self.resolve)
        except CallbackRefused as exc:
            raise bad_request(str(exc), field="callback_url") from None
        return Webhook(url=url, secret=self.token())

    def subscribe(self, webhook: Webhook, key: str, *, principal: Principal) -> None:
        """Have the build's finish POSTed to ``webhook`` for ``principal``."""
        self.webhooks.subscribe(key, webhook.url, base_url=self.public_url,
                                requester=principal.requester, secret=webhook.secret)


def platform_requests(data: dict[str, Any], *, max_plugins: int) -> list[BuildRequest]:
    """Validate a multi-platform request; return one BuildRequest per platform, in order."""
    platforms = data.get("platforms")
    given = [name for name in PLATFORM_FIELDS if name in data]
    if given:
        raise bad_request(f"give either {'/'.join(given)} or platforms, not both",
                          field="platforms")
    if not isinstance(platforms, list) or not platforms:
        raise bad_request('platforms must be a non-empty list like [{"os": "linux", '
                          '"arch": "amd64"}, {"os": "linux", "arch": "arm", "arm": 7}]',
                          field="platforms")
    if len(platforms) > MAX_PLATFORMS:
        raise bad_request(f"{len(platforms)} platforms asked for; at most {MAX_PLATFORMS}",
                          field="platforms")
    common = {k: v for k, v in data.items() if k != "platforms"}
    requests: list[BuildRequest] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, platform in enumerate(platforms):
        where = f"platforms[{i}]"
        if not isinstance(platform, dict):
            raise bad_request(f'{where} must be an object like {{"os": "linux", '
                              '"arch": "amd64"}', field=where)
        unknown = sorted(set(platform) - set(PLATFORM_FIELDS))
        if unknown:
            raise bad_request(f"{where} has unknown field(s) {', '.join(unknown)}; accepted: "
                              + ", ".join(PLATFORM_FIELDS), field=f"{where}.{unknown[0]}")
        try:
            request = request_from_json({**common, **platform}, max_plugins=max_plugins)
        except ApiError as exc:
            field = exc.field
            if field and field.split("[")[0] in PLATFORM_FIELDS:
                raise bad_request(f"{where}: {exc.message}", field=f"{where}.{field}") from None
            raise
        platform_key = (request.os, request.arch, request.arm)
        if platform_key in seen:
            raise bad_request(f"{where} repeats platforms[{seen[platform_key]}]", field=where)
        seen[platform_key] = i
        requests.append(request)
    return requests


def group_document(gid: str, keys: list[str], *, queue: QueueManager) -> dict[str, Any]:
    """Return the public JSON form of a group: its state and each build's document."""
    builds = []
    for key in keys:
        row = queue.get(key)
        if row is not None:
            builds.append(build_document(row, queue=queue))
    return {
        "id": gid,
        "state": group_state(b["state"] for b in builds),
        "builds": builds,
        "links": {"self": f"/api/groups/{gid}"},
    }


class GroupResource:
    """``/api/groups/{id}``: the builds of a multi-platform request."""

    def __init__(self, *, groups: GroupManager, queue: QueueManager) -> None:
        self.groups = groups
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response, gid: str) -> None:
        if not GROUP_PATTERN.match(gid):
            raise not_found(f"{gid!r} is not a group id (g_ and 32 hex characters)")
        keys = self.groups.keys(gid)
        if keys is None:
            raise not_found(f"no group {gid}")
        resp.media = group_document(gid, keys, queue=self.queue)


#: platforms one request may ask for (Kiln offers about thirty)
MAX_PLATFORMS = 32
GROUP_PATTERN = re.compile(r"^g_[0-9a-f]{32}$")


def group_state(states: Iterable[str]) -> str:
    """Summarize the builds' states: queued, running, succeeded, or failed if any did not."""
    found = set(states)
    if found <= {"succeeded"}:
        return "succeeded"
    if "running" in found or ({"queued"} & found and found - {"queued"}):
        return "running"
    if found == {"queued"}:
        return "queued"
    return "failed"
