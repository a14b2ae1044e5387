"""AWS Lambda entry point of the janitor: ``functions.janitor.lambda_handler.handler``.

Scheduled (EventBridge, e.g. ``rate(1 minute)``): each invocation applies pending
migrations and runs every janitor job that is due (``Janitor.run_once``; each job keeps its
own interval across invocations and janitors). When ``janitor.cloudwatch_namespace`` is set
it then publishes the queue depth there, for the worker Auto Scaling group to scale on:
``QueuedBuilds`` (claimable now by a worker of a toolchain the fleet offers),
``RunningBuilds``, ``WorkerSlots`` (builds the live workers can run at once) and
``UnclaimableBuilds`` (queued for a toolchain no worker offers), without dimensions, and
the first three again per toolchain (dimensions ``Sandbox`` and ``GoVersion``;
kiln/janitor/scaling.py). The janitor and its connection pool live across warm
invocations.
"""

from __future__ import annotations

import logging
from typing import Any

from kiln.config import Config

log = logging.getLogger("kiln.lambda")


class JanitorFunction:
    """The janitor as a one-shot scheduled handler."""

    def __init__(self, config: Config, *, janitor: Any = None) -> None:
        from kiln.wiring import database_url, make_janitor

        self.config = config
        self.janitor = janitor if janitor is not None else make_janitor(
            config, url=database_url(config))

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Run the due janitor jobs once, publish the queue depth; return both."""
        from kiln.janitor.scaling import publish, queue_by_toolchain, queue_depth

        results = self.janitor.run_once()
        toolchains = queue_by_toolchain(
            self.janitor.queue.pool, worker_live_seconds=self.config.janitor.worker_gone_seconds)
        values = queue_depth(toolchains)
        namespace = self.config.janitor.cloudwatch_namespace
        if namespace:
            publish(values, namespace=namespace, toolchains=toolchains)
        log.info("janitor run: %s; queue: %s", results, values)
        return {"jobs": results, "queue": values, "toolchains": toolchains}

    def close(self) -> None:
        """Close the janitor's connection pool."""
        self.janitor.queue.pool.close()


_function: JanitorFunction | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda handler: one janitor run (wired from the config on the first call)."""
    global _function
    if _function is None:
        from kiln.config import load_config
        from kiln.logconfig import setup_logging

        config = load_config()
        setup_logging(config.logging, process="janitor")
        _function = JanitorFunction(config)
    return _function(event, context)
