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
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from gunicorn.glogging import Logger as GunicornBaseLogger
from pythonjsonlogger.json import JsonFormatter

from kiln.config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_name)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process_name)s %(message)s"


#: gunicorn's loggers: taken over inside the API's processes
GUNICORN_LOGGERS = ("gunicorn.error", "gunicorn.access")
#: the fields text lines show, in this order, when a line has them
CONTEXT_FIELDS = ("request_id", "build_key", "step", "worker_id")

#: what a text line shows escaped: C0 and C1 controls (newline, carriage return, ESC, NUL...),
#: DEL, Unicode line and paragraph separators and bidirectional overrides. Messages carry
#: what clients send (request paths, headers); raw, these would start forged lines or
#: rewrite a terminal
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100
                                  else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """Return ``text`` with control characters written as Python-style escapes."""
    return _UNPRINTABLE.sub(_escape_char, text)


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
    """The text format, with the context fields at the end of the first line.

    A record's message and fields are one line whatever they hold (control characters are
    escaped); only a traceback, after it, spans several.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{name}={escape_controls(str(value))}" for name in CONTEXT_FIELDS
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


class _GunicornAccess(logging.Filter):
    """Give gunicorn's access lines the request id the response carried."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping) \
                and not hasattr(record, "request_id"):
            try:
                rid = record.args["{x-request-id}o"]
            except KeyError:
                rid = None
            if rid and rid != "-":
                record.request_id = rid
        return True


def make_handler(config: LoggingConfig, *, process: str) -> logging.Handler:
    """Return a stderr handler writing lines in the configured format, with context."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process))
    handler.addFilter(_Context())
    handler.addFilter(_GunicornAccess())
    if config.format == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level"}))
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    return handler


def _adopt_gunicorn(handler: logging.Handler) -> None:
    """Send gunicorn's own lines (when it logs them at all) through ``handler`` too."""
    for name in GUNICORN_LOGGERS:
        if name not in logging.Logger.manager.loggerDict:
            continue  # not inside gunicorn
        gunicorn_log = logging.getLogger(name)
        if gunicorn_log.handlers:  # a disabled access log stays disabled
            gunicorn_log.handlers[:] = [handler]
            gunicorn_log.propagate = False


def setup_logging(config: LoggingConfig, *, process: str) -> None:
    """Send this process's logs to stderr in the configured format."""
    handler = make_handler(config, process=process)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for noisy in ("urllib3", "docker", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
    _adopt_gunicorn(handler)


class GunicornLogger(GunicornBaseLogger):
    """gunicorn's logger writing Kiln's format, in the master process too.

    ``gunicorn --logger-class kiln.logconfig.GunicornLogger``: gunicorn's error and access
    lines become JSON with ``logging.format: json``, access lines with their request id.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from kiln.config import ConfigError, load_config

        try:
            config = load_config().logging
        except ConfigError:
            config = LoggingConfig()  # the app itself reports the bad config
        _adopt_gunicorn(make_handler(config, process="api"))
