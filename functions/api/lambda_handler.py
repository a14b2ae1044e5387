"""AWS Lambda entry point of the API: ``functions.api.lambda_handler.handler``.

The same Falcon app as under gunicorn, wrapped by apig-wsgi for API Gateway (HTTP APIs with
payload 1.0 or 2.0, REST APIs) and Application Load Balancer events. Install the ``lambda``
extra (``pip install 'kiln[lambda]'``); ``infra/lambda/package.sh`` builds the deployment zip.

A function's response is buffered and capped (6 MB; 1 MB behind an ALB), and a Caddy binary
is larger: downloads must be redirects to the store, so a cold start refuses any storage but
``storage.backend: s3`` with ``storage.serve: redirect``. API Gateway ends a request after
29 s: keep ``api.max_wait`` under that and let ``api.wait_redirects`` carry longer builds
(docs/deploy.md, "Function runtime").
"""

from __future__ import annotations

import logging
from typing import Any

from kiln.config import Config, ConfigError

log = logging.getLogger("kiln.lambda")

#: API Gateway's integration timeout, seconds (REST APIs: 29; HTTP APIs: 30)
API_GATEWAY_TIMEOUT_SECONDS = 29.0


def check_config(config: Config) -> None:
    """Raise ConfigError unless the config can serve from a function runtime."""
    problems = []
    if config.storage.backend != "s3":
        problems.append("storage.backend must be s3 (KILN_STORAGE__BACKEND=s3): a function "
                        "has no lasting disk for artifacts")
    if config.storage.serve != "redirect":
        problems.append("storage.serve must be redirect (KILN_STORAGE__SERVE=redirect): a "
                        "function's response is capped at 6 MB, and binaries are larger")
    if problems:
        raise ConfigError("the API cannot run as a function:\n  " + "\n  ".join(problems))


class ApiFunction:
    """Kiln's WSGI app as a Lambda handler; warns once when a limit cuts held downloads."""

    def __init__(self, config: Config, *, services: Any = None) -> None:
        from apig_wsgi import make_lambda_handler

        from kiln.api.app import create_app
        from kiln.wiring import make_services

        check_config(config)
        self.config = config
        self.services = services if services is not None else make_services(config)
        # binary_support: checksums, signatures and the like answer raw bytes
        self._handler = make_lambda_handler(create_app(self.services), binary_support=True)
        self._warned: set[str] = set()

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Serve one API Gateway or ALB event."""
        self._check_limits(event, context)
        return dict(self._handler(event, context))

    def _warn_once(self, what: str, message: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    def _check_limits(self, event: dict[str, Any], context: Any) -> None:
        max_wait = self.config.api.max_wait
        request = event.get("requestContext")
        behind_gateway = isinstance(request, dict) and "elb" not in request and (
            "apiId" in request or "http" in request)
        if behind_gateway and max_wait >= API_GATEWAY_TIMEOUT_SECONDS:
            self._warn_once("gateway", "api.max_wait is %.0f s but API Gateway ends requests "
                            "after %.0f s: set KILN_API__MAX_WAIT=25 and "
                            "KILN_API__WAIT_REDIRECTS=9", max_wait, API_GATEWAY_TIMEOUT_SECONDS)
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if callable(remaining) and remaining() / 1000 < max_wait + 1:
            self._warn_once("timeout", "api.max_wait is %.0f s but this function times out "
                            "after %.0f s: raise its timeout or lower api.max_wait",
                            max_wait, remaining() / 1000)

    def close(self) -> None:
        """Stop the metrics flusher and the notification listener; close the pool."""
        for name in ("metrics", "notifier"):
            part = getattr(self.services, name, None)
            if part is not None:
                part.stop()
        self.services.queue.pool.close()


_function: ApiFunction | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda handler: serve the event (the app is built from the config on the first call)."""
    global _function
    if _function is None:
        from kiln.config import load_config
        from kiln.logconfig import setup_logging

        config = load_config()
        setup_logging(config.logging, process="api")
        _function = ApiFunction(config)
    return _function(event, context)
