"""The API as a function (AWS Lambda): what the runtime's limits demand of the config.

A function's response is buffered and capped (6 MB; 1 MB behind an ALB), and a Caddy binary
is larger: downloads must be redirects to the store, so only ``storage.backend: s3`` with
``storage.serve: redirect`` can serve. API Gateway ends a request after 29 s: keep
``api.max_wait`` under that and let ``api.wait_redirects`` carry longer builds
(docs/deploy.md, "Function runtime"). The handler is functions/api/lambda_handler.py.
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


class RuntimeLimits:
    """Warn once, in the log, when the runtime would cut the config's held downloads short."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._warned: set[str] = set()

    def _warn_once(self, what: str, message: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    def check(self, event: dict[str, Any], context: Any) -> None:
        """Look at one event and its context; warn about each limit the first time."""
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
