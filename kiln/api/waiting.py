"""Redirect-and-wait: hold a download longer than the runtime lets one response last.

The blocking endpoints (``/api/download``, ``/api/compat``) hold a request for up to
``api.max_wait`` seconds while its build runs. Some runtimes cut a response short: API
Gateway after 29 s, a load balancer at its idle timeout. With ``api.wait_redirects`` N > 0,
a request whose build is still queued or running when ``max_wait`` runs out is answered
``307 Temporary Redirect`` to the same URL with ``kiln_wait=<count>``; clients that follow
redirects (Go's ``net/http`` in ``caddy upgrade``, ``curl -L``, browsers) come straight back
and wait again, up to N times, so a client waits about ``(N + 1) * max_wait`` in total.
After that the endpoint answers its usual timeout error. A 307 is never a 2xx, so no client
mistakes it for the binary; it keeps the method (a HEAD stays a HEAD).

The ``Location`` is a query-only relative reference (``?os=linux&...&kiln_wait=2``): it
resolves against the URL the client used, whatever path prefix a gateway stage or a reverse
proxy added in front of Kiln.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import falcon

#: query parameter counting the redirects a waiting client has followed
WAIT_PARAM = "kiln_wait"
#: redirects Go's net/http client follows before it gives up ("stopped after 10 redirects")
GO_CLIENT_MAX_REDIRECTS = 9


def waits_so_far(req: falcon.Request) -> int:
    """Return how many wait redirects this client has followed (0 for a first request)."""
    value = req.get_param(WAIT_PARAM) or ""
    return int(value) if value.isdigit() and len(value) <= 3 else 0


def wait_location(req: falcon.Request, count: int) -> str:
    """Return the relative URL of the same request with the wait counter set to ``count``."""
    pairs = [(name, value) for name, value in parse_qsl(req.query_string, keep_blank_values=True)
             if name != WAIT_PARAM]
    pairs.append((WAIT_PARAM, str(count)))
    return "?" + urlencode(pairs)


def redirect_to_wait(req: falcon.Request, resp: falcon.Response, *, max_redirects: int) -> bool:
    """Answer 307 to the same URL with the wait counter raised; False when no redirect is left.

    Call it when ``max_wait`` has run out and the build is still queued or running; on False,
    answer the endpoint's usual timeout error.
    """
    count = waits_so_far(req)
    if count >= max_redirects:
        return False
    resp.status = falcon.HTTP_307
    resp.location = wait_location(req, count + 1)
    resp.set_header("Cache-Control", "no-store")
    resp.media = {"status_code": 307, "waiting": True, "redirects_left": max_redirects - count - 1}
    return True
