"""API entry point: ``gunicorn functions.api:app``. Reads the config once, when first used."""

from __future__ import annotations

from typing import Any

_app: Any = None


def get_app() -> Any:
    """Build the WSGI app from the config file and environment."""
    global _app
    if _app is None:
        from kiln.api import create_app
        from kiln.app import make_services
        from kiln.config import load_config
        from kiln.logconfig import setup_logging

        config = load_config()
        setup_logging(config.logging, process="api")
        _app = create_app(make_services(config))
    return _app


def __getattr__(name: str) -> Any:
    if name == "app":
        return get_app()
    raise AttributeError(name)
