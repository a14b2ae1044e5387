"""Process logging: JSON lines (python-json-logger) or plain text, one setup per process.

Lines carry their context: the id of the HTTP request (``request_id``) or the build
(``build_key``) they are about. Code passes it as ``extra={...}``, or binds it for a whole
request or build with ``log_context`` (a context variable, so per thread), and every line
logged meanwhile, by any module, carries it. JSON lines have the fields; text lines end
with ``[request_id=... build_key=...]``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

from kiln.config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_name)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process_name)s %(message)s"


#: the fields text lines show, in this order, when a line has them
CONTEXT_FIELDS = ("request_id", "build_key", "step", "worker_id")

_context: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "kiln_log_context", default=None)


def bind_context(**fields: str) -> contextvars.Token[Mapping[str, str] | None]:
    """Add fields to every line this thread logs until unbind_context(token)."""
    return _context.set({**(_context.get() or {}), **fields})


def unbind_context(token: contextvars.Token[Mapping[str, str] | None]) -> None:
    """Drop the fields bound with the token's bind_context."""
    _context.reset(token)


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add fields to every line logged in this thread within the block."""
    token = bind_context(**fields)
    try:
        yield
    finally:
        unbind_context(token)


class _Context(logging.Filter):
    """Put the bound context on each record (explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The text format, with the context fields at the end of the first line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{name}={value}" for name in CONTEXT_FIELDS
                  if (value := getattr(record, name, None))]
        if not fields:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(fields)}]{newline}{rest}"


class _ProcessName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        return True


def setup_logging(config: LoggingConfig, *, process: str) -> None:
    """Send this process's logs to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process))
    handler.addFilter(_Context())
    if config.format == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level"}))
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for noisy in ("urllib3", "docker", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
