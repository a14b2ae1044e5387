"""AWS Lambda entry point of the API: ``functions.api.lambda_handler.handler``.

The same Falcon app as under gunicorn, wrapped by apig-wsgi for API Gateway (HTTP APIs with
payload 1.0 or 2.0, REST APIs) and Application Load Balancer events. Install the ``lambda``
extra (``pip install 'kiln[lambda]'``); ``infra/lambda/package.sh`` builds the deployment zip.
What the runtime's limits demand of the config: kiln/api/function.py.
"""

from __future__ import annotations

from typing import Any

from kiln.api.function import RuntimeLimits, check_config
from kiln.config import Config

__all__ = ["ApiFunction", "check_config", "handler"]


class ApiFunction:
    """Kiln's WSGI app as a Lambda handler; warns once when a limit cuts held downloads."""

    def __init__(self, config: Config, *, services: Any = None) -> None:
        from apig_wsgi import make_lambda_handler

        from kiln.api.app import create_app
        from kiln.wiring import make_services

        check_config(config)
        self.config = config
        self.limits = RuntimeLimits(config)
        self.services = services if services is not None else make_services(config)
        # binary_support: checksums, signatures and the like answer raw bytes
        self._handler = make_lambda_handler(create_app(self.services), binary_support=True)

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Serve one API Gateway or ALB event."""
        self.limits.check(event, context)
        return dict(self._handler(event, context))

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
