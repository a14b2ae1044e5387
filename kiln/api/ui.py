"""The web UI: static pages from ``kiln/api/web``, and the small JSON endpoints they use."""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

import falcon

from kiln.api.documents import KEY_PATTERN
from kiln.api.errors import ApiError, bad_request, not_found
from kiln.api.service import BuildService
from kiln.errors import SpecError
from kiln.request.platforms import DEFAULT_ARM, PLATFORMS
from kiln.resolve.proxy import ModuleNotFound, ProxyUnavailable

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_ASSET = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(css|js|svg|png)$")
# scripts and styles come from Kiln alone; nothing inline, nothing from elsewhere
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
#: plugin versions listed for the version picker
MAX_PLUGIN_VERSIONS = 50


@cache
def web_file(name: str) -> bytes | None:
    """Return the bytes of a file of ``kiln/api/web``, or None."""
    entry = resources.files("kiln.api").joinpath("web").joinpath(name)
    return entry.read_bytes() if entry.is_file() else None


def _serve(req: falcon.Request, resp: falcon.Response, name: str) -> None:
    body = web_file(name)
    if body is None:
        raise not_found(f"no such file: {name}")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    resp.content_type = CONTENT_TYPES[name[name.rindex("."):]]
    resp.set_header("ETag", etag)
    # revalidate every time: a new Kiln version must never run with stale scripts
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Content-Type-Options", "nosniff")
    if req.if_none_match and any(str(tag) == etag.strip('"') for tag in req.if_none_match):
        resp.status = falcon.HTTP_304
        return
    resp.data = body


class PageResource:
    """``/`` and ``/builds/{key}``: the single page; its script shows the right view."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str | None = None) -> None:
        if key is not None and not KEY_PATTERN.match(key):
            # a mistyped link gets the reason, not a page that can only say "not found"
            raise not_found(f"{key[:80]!r} is not a build key (64 lowercase hex characters)")
        _serve(req, resp, "index.html")
        resp.set_header("Content-Security-Policy", CSP)
        resp.set_header("Referrer-Policy", "same-origin")


class AssetResource:
    """``/static/{name}``: the UI's scripts, styles and images."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if not _ASSET.match(name):
            raise not_found(f"no such file: {name}")
        _serve(req, resp, name)


class PlatformsResource:
    """``/api/platforms``: every os/arch Kiln builds, with the GOARM values each takes."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            "platforms": [{"os": os_, "arch": arch, "arm": list(arms)}
                          for (os_, arch), arms in PLATFORMS.items()],
            "default_arm": DEFAULT_ARM,
        }
        resp.set_header("Cache-Control", "public, max-age=3600")


class PluginVersionsResource:
    """``/api/plugin-versions?path=``: a plugin's module and its versions, newest first."""

    def __init__(self, *, service: BuildService) -> None:
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        path = re.sub(r"^https?://", "", (req.get_param("path") or "").strip())
        if not path:
            raise bad_request("give the plugin's package path: ?path=github.com/owner/repo",
                              field="path")
        resolver = self.service.resolver.for_request()
        try:
            module, latest = resolver.resolve_package(path, "latest")
            versions = resolver.available_versions(module)
        except SpecError as exc:
            raise bad_request(str(exc), field="path") from None
        except ModuleNotFound as exc:
            raise not_found(str(exc)) from None
        except ProxyUnavailable as exc:
            raise ApiError(falcon.HTTP_502,
                           f"the Go module proxy cannot be reached: {exc}") from None
        resp.media = {"path": path, "module": module, "latest": latest,
                      "versions": versions[:MAX_PLUGIN_VERSIONS]}
        resp.set_header("Cache-Control", "public, max-age=300")


def add_routes(app: falcon.App, *, service: BuildService) -> None:
    """Serve the web UI and the endpoints only it needs."""
    page = PageResource()
    app.add_route("/", page)
    app.add_route("/builds/{key}", page)
    app.add_route("/static/{name}", AssetResource())
    app.add_route("/api/platforms", PlatformsResource())
    app.add_route("/api/plugin-versions", PluginVersionsResource(service=service))
