"""Who may do what over HTTP: bearer API keys, checked by one Falcon middleware.

Every route has a requirement:

* ``public``: anyone (a key, if sent, must still be valid);
* ``build``: starts builds; anyone in ``auth.mode: open``, a key in ``auth.mode: keys``;
* ``key``: any valid key (the responder then checks what this key may touch);
* ``admin``: an admin key.

The requirement comes from the resource's ``auth`` attribute (``{"POST": "build"}``) if it
has one, else from ``POLICY``, else ``admin`` under ``/api/admin/`` and ``public``
elsewhere. No key where one is needed, or a wrong or revoked key, is a 401; a valid key
without the scope is a 403.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import falcon

from kiln.api.errors import ApiError
from kiln.api.principal import Network, Principal, client_address, principal_of
from kiln.api.quota import QuotaExceeded
from kiln.db.api_keys import KeyManager

PUBLIC = "public"
BUILD = "build"
KEY = "key"
ADMIN = "admin"

ADMIN_PREFIX = "/api/admin/"

#: requirements by (method, route template), for resources that do not declare their own
POLICY: dict[tuple[str, str], str] = {
    ("POST", "/api/builds"): BUILD,
    ("DELETE", "/api/builds/{key}"): KEY,
    # caddyserver.com-compatible endpoints start builds too
    ("GET", "/api/download"): BUILD,
    ("HEAD", "/api/download"): BUILD,
    ("GET", "/api/compat"): BUILD,
    ("HEAD", "/api/compat"): BUILD,
    # version look-ups ask the module proxy (which may hold credentials, and answers
    # slowly): with auth.mode keys, only key holders may make Kiln ask it
    ("GET", "/api/versions"): BUILD,
    ("GET", "/api/plugin-versions"): BUILD,
}

CHALLENGE = 'Bearer realm="kiln"'


def unauthorized(message: str, *, invalid: bool = False) -> ApiError:
    """Return a 401 asking for a bearer key."""
    challenge = CHALLENGE + (', error="invalid_token"' if invalid else "")
    return ApiError(falcon.HTTP_401, message, headers={"WWW-Authenticate": challenge})


def forbidden(message: str) -> ApiError:
    """Return a 403: the key is valid but may not do this."""
    return ApiError(falcon.HTTP_403, message)


class AuthMiddleware:
    """Find who is asking, and refuse what they may not do."""

    def __init__(self, *, keys: KeyManager, mode: str = "open",
                 trusted_proxies: Sequence[Network] = ()) -> None:
        self.keys = keys
        self.mode = mode
        self.trusted_proxies = tuple(trusted_proxies)

    def requirement(self, method: str, template: str, resource: object) -> str:
        """Return what ``method`` on ``template`` needs."""
        declared = getattr(resource, "auth", None)
        if isinstance(declared, Mapping) and method in declared:
            return str(declared[method])
        if (method, template) in POLICY:
            return POLICY[(method, template)]
        if template.startswith(ADMIN_PREFIX) or template == ADMIN_PREFIX.rstrip("/"):
            return ADMIN
        return PUBLIC

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        address = client_address(req.remote_addr or "", req.get_header("X-Forwarded-For"),
                                 self.trusted_proxies)
        req.context.client_address = address
        req.context.principal = Principal(address=address)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         params: dict[str, Any]) -> None:
        if resource is None:
            return
        principal = principal_of(req)
        header = req.get_header("Authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise unauthorized("send the API key as 'Authorization: Bearer <token>'")
            key = self.keys.authenticate(token)
            if key is None:
                raise unauthorized("this API key is not valid: it is unknown or was revoked "
                                   "(an operator makes keys with `kiln keys create`)",
                                   invalid=True)
            principal = Principal(address=principal.address, key=key)
            req.context.principal = principal
        need = self.requirement(req.method, req.uri_template or req.path, resource)
        if need == PUBLIC or (need == BUILD and self.mode == "open"):
            return
        if principal.key is None:
            what = {BUILD: "Building needs an API key on this server",
                    KEY: "This needs an API key",
                    ADMIN: "This needs an admin API key"}.get(need, "This needs an API key")
            raise unauthorized(f"{what}: send it as 'Authorization: Bearer <token>'")
        if need == ADMIN and not principal.is_admin:
            raise forbidden(f"{principal.describe()} has the {principal.key.scope} scope; "
                            "this needs an admin key")


def handle_quota(req: falcon.Request, resp: falcon.Response, ex: QuotaExceeded,
                 params: dict[str, Any]) -> None:
    """Turn QuotaExceeded into a 429 with Retry-After."""
    raise ApiError(falcon.HTTP_429, ex.message,
                   headers={"Retry-After": str(ex.retry_after)}) from ex
