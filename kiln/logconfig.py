"""Process logging: JSON lines (python-json-logger) or plain text, one setup per process."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from kiln.config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_name)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process_name)s %(message)s"


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
    if config.format == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for noisy in ("urllib3", "docker", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
