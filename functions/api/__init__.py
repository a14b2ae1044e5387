"""API entry point: ``gunicorn functions.api:app``. Reads the config once, when first used."""

from __future__ import annotations

from typing import Any

_app: Any = None


def get_app() -> Any:
    """Build the WSGI app from the config file and environment."""
    global _app
    if _app is None:
        from kiln.api.app import create_app
        from kiln.config import load_config
        from kiln.logconfig import setup_logging
        from kiln.wiring import database_url, make_dependencies, make_services

        config = load_config()
        setup_logging(config.logging, process="api")
        services = make_services(config)
        _app = create_app(services)
        # the API starts whatever it cannot reach (it answers 503 until it can): say what
        from kiln.readiness import probe, report

        report(probe(make_dependencies(config, "api", url=database_url(config))), role="api",
               consequence="/healthz answers 503 until it is back")
    return _app


def __getattr__(name: str) -> Any:
    if name == "app":
        return get_app()
    raise AttributeError(name)
