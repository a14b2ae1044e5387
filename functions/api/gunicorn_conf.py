"""Gunicorn settings from Kiln's config: ``gunicorn -c python:functions.api.gunicorn_conf``.

The API image starts gunicorn this way, so ``api.listen``, ``api.processes`` and
``api.threads`` (``KILN_API__LISTEN`` ...) mean the same in a container as under
``kiln serve``. Any gunicorn flag can still be added through ``GUNICORN_CMD_ARGS``
(e.g. ``--keep-alive 3700`` behind a load balancer with a 3600 s idle timeout).
"""

from __future__ import annotations

from kiln.config import load_config
from kiln.standalone import WORKER_CLASS

#: seconds an idle client connection stays open; keep it above the load balancer's idle
#: timeout in production (GUNICORN_CMD_ARGS="--keep-alive N"), or the balancer may reuse a
#: connection gunicorn is closing and answer 502
KEEPALIVE_SECONDS = 75

_config = load_config()

wsgi_app = "functions.api:app"
bind = [_config.api.listen]
workers = _config.api.processes
threads = _config.api.threads
# held downloads wait on a notification, not on the CPU: threads, not processes, carry them
# (gunicorn's gthread worker, answering the requests gunicorn refuses itself in JSON)
worker_class = WORKER_CLASS
# a held /api/download may legitimately take api.max_wait seconds
timeout = 0
graceful_timeout = 10
keepalive = KEEPALIVE_SECONDS
accesslog = "-"
# gunicorn's own lines in Kiln's log format (JSON with logging.format: json)
logger_class = "kiln.logconfig.GunicornLogger"
# Kiln does not use gunicorn's control socket (gunicorn 27+), which it would make under HOME:
# the image's user has none (/nonexistent), so it logged a permission error at every start
control_socket_disable = True
