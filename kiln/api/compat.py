"""caddyserver.com's endpoints, for the clients that already call them.

- ``GET /api/download`` and ``/api/compat`` (``caddy upgrade``/``add-package``, curl, the
  Go prototype's form): hold the request until the binary exists, then answer with it
  (``200``, or a redirect to the store); never a 2xx without the binary.
- ``HEAD /api/download`` (the website): hold, then ``200`` with a ``Location`` the page
  navigates to, which serves the binary.
- ``GET /api/packages``: the plugin catalog in caddyserver.com's shape.
- ``GET /api/versions``: Caddy's versions from the module proxy, newest first.

A held request costs a thread (or greenlet) and no database connection: it waits on the
process's notification fan-out (kiln/api/waiter.py). It checks its client's socket between
naps, so a client that goes away frees it within a tick. It is counted against the client's
and the process's caps on held connections (kiln/api/held.py): past them, a build that is
not done yet is answered 503 with Retry-After (the build goes on).
"""

from __future__ import annotations

import _socket
import logging
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import falcon

from kiln.api.builds import serve_artifact, submit
from kiln.api.errors import ApiError, bad_request, request_id, unavailable
from kiln.api.held import SlotTable, client_of
from kiln.api.service import BuildService
from kiln.api.waiter import BuildWaiter, WaitResult, toolchain_of
from kiln.api.waiting import WAIT_PARAM, redirect_to_wait
from kiln.artifacts.store import ArtifactStore
from kiln.db.builds import Build, QueueManager
from kiln.errors import SpecError
from kiln.gomod.module import check_module_path
from kiln.request.catalog import Catalog, CatalogUnavailable
from kiln.request.spec import CADDY_MODULE, BuildRequest
from kiln.resolve.proxy import ModuleNotFound, ProxyUnavailable
from kiln.resolve.resolver import Resolver

log = logging.getLogger("kiln.api.compat")

#: query parameters of /api/download and /api/compat, by meaning
PLUGIN_PARAMS = ("p", "p[]")
REPLACE_PARAMS = ("r", "r[]", "replace")
CORE_PARAMS = ("version", "caddy_version")
#: idempotency: the website's cache buster; kiln_wait: redirect-and-wait's counter
SINGLE_PARAMS = ("os", "arch", "arm", "idempotency", WAIT_PARAM, *CORE_PARAMS)
ACCEPTED_PARAMS = (*SINGLE_PARAMS, *PLUGIN_PARAMS, *REPLACE_PARAMS)
#: status of a request whose client left before the answer (nginx's convention)
CLIENT_GONE = "499 Client Closed Request"
#: seconds /api/versions reuses a version list
VERSIONS_TTL_SECONDS = 300.0


def parse_download_query(query_string: str, *, max_plugins: int) -> BuildRequest:
    """Read caddyserver.com's download query into a BuildRequest; 400 if it is not one."""
    try:
        pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True,
                                       max_num_fields=4 * max_plugins + 20)
    except ValueError as exc:
        raise bad_request(f"the query string cannot be read: {exc}") from None
    singles: dict[str, str] = {}
    plugins: list[str] = []
    replacements: list[str] = []
    for name, value in pairs:
        if name in PLUGIN_PARAMS:
            plugins.append(value)
        elif name in REPLACE_PARAMS:
            replacements.append(value)
        elif name in SINGLE_PARAMS:
            if singles.setdefault(name, value) != value:
                raise bad_request(f"{name} is given twice with different values; give it once",
                                  field=name)
        else:
            raise bad_request(f"unknown parameter {name!r}; accepted: "
                              + ", ".join(ACCEPTED_PARAMS), field=name)
    cores = {singles[n] for n in CORE_PARAMS if singles.get(n)}
    if len(cores) > 1:
        raise bad_request("version and caddy_version disagree; give Caddy's version once",
                          field="version")
    core_field = next((n for n in CORE_PARAMS if singles.get(n)), "version")
    try:
        return BuildRequest.create(
            os=singles.get("os", ""), arch=singles.get("arch", ""), arm=singles.get("arm"),
            caddy_version=cores.pop() if cores else None, plugins=plugins,
            replacements=replacements, max_plugins=max_plugins,
        )
    except SpecError as exc:
        raise bad_request(str(exc), field=_param(exc.field, core_field)) from None


def _param(field: str, core_field: str) -> str:
    """Return the query parameter a SpecError field names."""
    if field.startswith("plugins"):
        return "p"
    if field.startswith("replacements"):
        return "r"
    if field == "caddy_version":
        return core_field
    return field


def peer_closed(sock: Any) -> bool:
    """Report whether the client closed (or reset) its connection, without blocking.

    A non-blocking MSG_PEEK at the socket level: b"" is the client's FIN. It works on
    gunicorn's sync and gthread sockets, on a TLS socket (the raw bytes are only peeked)
    and on gevent's (whose wrapped ``_sock`` is the real socket).
    """
    raw = getattr(sock, "_sock", sock)
    if not isinstance(raw, _socket.socket):
        return False
    try:
        data = _socket.socket.recv(raw, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


def client_gone(req: falcon.Request) -> Callable[[], bool]:
    """Return a check of whether this request's client went away (never, outside gunicorn)."""
    sock = req.env.get("gunicorn.socket")
    if sock is None:
        return lambda: False
    return lambda: peer_closed(sock)


class DownloadResource:
    """``/api/download`` and ``/api/compat``: build, hold, answer with the binary."""

    def __init__(self, *, service: BuildService, queue: QueueManager, store: ArtifactStore,
                 waiter: BuildWaiter, slots: SlotTable, max_wait: float, max_plugins: int,
                 redirect: bool, public_url: str = "", wait_redirects: int = 0) -> None:
        self.service = service
        self.queue = queue
        self.store = store
        self.waiter = waiter
        self.slots = slots
        self.max_wait = max_wait
        self.max_plugins = max_plugins
        self.redirect = redirect
        self.public_url = public_url.rstrip("/")
        self.wait_redirects = wait_redirects

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = parse_download_query(req.query_string, max_plugins=self.max_plugins)
        submitted = submit(self.service, request, req)
        key = submitted.key
        resp.set_header("X-Kiln-Build-Key", key)
        # the same URL may mean another build tomorrow ("latest"): never cache it
        resp.set_header("Cache-Control", "no-store")
        row = submitted.build
        waited = 0.0
        if row.state not in ("succeeded", "failed", "cancelled"):
            log.debug("holding %s %s for build %s", req.method, req.path, key,
                      extra={"request_id": request_id(req)})
            # the slot is given back however the wait ends: final, timeout, or client gone
            with self.slots.hold(client_of(req), "download", advice=(
                    f"build {key} goes on meanwhile and the same request is then answered "
                    f"from it (progress: GET /api/builds/{key})")):
                result = self.waiter.wait(key, timeout=self.max_wait, gone=client_gone(req))
            waited = result.waited
            row = self._settle(req, resp, key, result)
            if row is None:
                return
        self._answer(req, resp, row, waited)

    on_head = on_get

    def _settle(self, req: falcon.Request, resp: falcon.Response, key: str,
                result: WaitResult) -> Build | None:
        """Turn a wait that did not end in a final state into the right answer."""
        if result.outcome == "final" and result.row is not None:
            return result.row
        if result.outcome == "gone":
            log.info("client went away after %.1fs holding for build %s; this process now "
                     "holds %d requests with %d subscriptions", result.waited, key,
                     self.waiter.waiting(), self.waiter.subscriptions(),
                     extra={"request_id": request_id(req)})
            resp.status = CLIENT_GONE
            return None
        if result.outcome == "no_worker":
            sandbox, go_version = toolchain_of(result.row) if result.row else (None, None)
            raise ApiError(falcon.HTTP_502, f"no build worker is running with the toolchain "
                           f"build {key} is keyed with (sandbox {sandbox}, {go_version}), so "
                           "it cannot start; try again later (it stays queued)")
        if result.outcome == "missing":
            raise unavailable(f"build {key} disappeared while it was awaited; ask again")
        if redirect_to_wait(req, resp, max_redirects=self.wait_redirects):
            return None
        state = result.row.state if result.row else "queued"
        raise ApiError(falcon.HTTP_504, f"build {key} is still {state} after "
                       f"{result.waited:.0f}s; it goes on: ask again later and the same "
                       f"request is answered from it (progress: GET /api/builds/{key})")

    def _answer(self, req: falcon.Request, resp: falcon.Response, row: Build,
                waited: float) -> None:
        key = row.key
        if row.state == "failed":
            if row.error_kind == "retryable":
                raise ApiError(falcon.HTTP_502, f"build {key} could not be completed after "
                               f"{row.attempts} attempts: {row.error}")
            raise bad_request(f"build failed: {row.error} (build {key})")
        if row.state == "cancelled":
            raise unavailable(f"build {key} was cancelled; ask again to build it again")
        if not row.artifact_path:
            # succeeded, but the artifact was collected since: the next request rebuilds it
            raise unavailable(f"the binary of build {key} was removed; ask again to rebuild it")
        log.info("%s %s: build %s served after %.1fs held", req.method, req.path, key, waited,
                 extra={"request_id": request_id(req)})
        if req.method == "HEAD":
            # the website HEADs, then navigates to Location: a URL that serves the binary
            serve_artifact(req, resp, store=self.store, queue=self.queue, row=row,
                           redirect=False)
            resp.location = f"{self.public_url}/api/builds/{key}/artifact"
        else:
            serve_artifact(req, resp, store=self.store, queue=self.queue, row=row,
                           redirect=self.redirect)
        resp.set_header("Cache-Control", "no-store")


class PackagesResource:
    """``/api/packages``: the plugin catalog, in caddyserver.com's shape."""

    def __init__(self, *, catalog: Catalog | None) -> None:
        self.catalog = catalog

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            packages = self.catalog.packages() if self.catalog is not None else []
        except CatalogUnavailable as exc:
            raise unavailable(str(exc)) from None
        resp.media = {"status_code": 200, "result": [p.to_dict() for p in packages]}
        resp.set_header("Cache-Control", "public, max-age=60")


#: modules whose version lists /api/versions keeps (each a few KB)
VERSIONS_CACHE_ENTRIES = 256


class VersionsResource:
    """``/api/versions``: a module's versions (Caddy's by default), newest first."""

    def __init__(self, *, resolver: Resolver, ttl: float = VERSIONS_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        #: newest answers, least recently used dropped first: any module may be asked for
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        module = req.get_param("module") or CADDY_MODULE
        try:
            check_module_path(module, field="module")
        except SpecError as exc:
            raise bad_request(str(exc), field="module") from None
        resp.media = {"status_code": 200, "result": self._versions(module)}
        resp.set_header("Cache-Control", "public, max-age=60")

    def _versions(self, module: str) -> dict[str, Any]:
        with self._lock:
            hit = self._cache.get(module)
        if hit is not None and self.clock() - hit[0] < self.ttl:
            return hit[1]
        resolver = self.resolver.for_request()
        try:
            versions = resolver.available_versions(module)
            latest = resolver.resolve(module, "latest")
        except ModuleNotFound as exc:
            raise ApiError(falcon.HTTP_404, str(exc), field="module") from None
        except ProxyUnavailable as exc:
            raise ApiError(falcon.HTTP_502, f"the Go module proxy cannot be reached: {exc}") from None
        result = {"module": module, "latest": latest, "versions": versions}
        with self._lock:
            self._cache[module] = (self.clock(), result)
            self._cache.move_to_end(module)
            while len(self._cache) > VERSIONS_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return result


def add_routes(app: falcon.App, *, service: BuildService, queue: QueueManager,
               store: ArtifactStore, waiter: BuildWaiter, slots: SlotTable,
               catalog: Catalog | None,
               max_wait: float, max_plugins: int, redirect: bool, public_url: str,
               wait_redirects: int = 0, versions_ttl: float = VERSIONS_TTL_SECONDS) -> None:
    """Mount caddyserver.com's endpoints on ``app``."""
    download = DownloadResource(service=service, queue=queue, store=store, waiter=waiter,
                                slots=slots, max_wait=max_wait, max_plugins=max_plugins, redirect=redirect,
                                public_url=public_url, wait_redirects=wait_redirects)
    app.add_route("/api/download", download)
    app.add_route("/api/compat", download)
    app.add_route("/api/packages", PackagesResource(catalog=catalog))
    app.add_route("/api/versions", VersionsResource(resolver=service.resolver, ttl=versions_ttl))

