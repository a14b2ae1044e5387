"""AWS Lambda entry point of the janitor: ``functions.janitor.lambda_handler.handler``.

Scheduled (EventBridge, e.g. ``rate(1 minute)``): each invocation applies pending
migrations and runs every janitor job that is due (``Janitor.run_once``; each job keeps its
own interval across invocations and janitors). When ``janitor.cloudwatch_namespace`` is set
it then publishes the queue depth there, for the worker Auto Scaling group to scale on:
``QueuedBuilds`` (claimable now), ``RunningBuilds`` and ``WorkerSlots`` (builds the live
workers can run at once): the gauges ``/metrics`` shows. The janitor and its connection
pool live across warm invocations.
"""

from __future__ import annotations

import logging
from typing import Any

from kiln.config import Config

log = logging.getLogger("kiln.lambda")

#: CloudWatch metric name → (Prometheus gauge of kiln.metrics, its state label or None)
GAUGES = {
    "QueuedBuilds": ("kiln_queue_depth", None),
    "RunningBuilds": ("kiln_builds", "running"),
    "WorkerSlots": ("kiln_worker_slots", None),
}


def queue_depth(pool: Any, *, worker_live_seconds: float) -> dict[str, float]:
    """Return the gauges GAUGES names, read from the database as /metrics reads them."""
    from kiln.metrics import KilnCollector

    wanted = {(gauge, state): name for name, (gauge, state) in GAUGES.items()}
    values = dict.fromkeys(GAUGES, 0.0)
    collector = KilnCollector(pool, worker_live_seconds=worker_live_seconds)
    for metric in collector.collect():
        for sample in metric.samples:
            name = wanted.get((sample.name, sample.labels.get("state")))
            if name is not None:
                values[name] = float(sample.value)
    return values


def publish(values: dict[str, float], *, namespace: str, client: Any = None) -> None:
    """Put the gauges into CloudWatch, one metric each, without dimensions."""
    if client is None:
        import boto3

        client = boto3.client("cloudwatch")
    client.put_metric_data(Namespace=namespace, MetricData=[
        {"MetricName": name, "Value": value, "Unit": "Count"} for name, value in values.items()
    ])


class JanitorFunction:
    """The janitor as a one-shot scheduled handler."""

    def __init__(self, config: Config, *, janitor: Any = None) -> None:
        from kiln.wiring import database_url, make_janitor

        self.config = config
        self.janitor = janitor if janitor is not None else make_janitor(
            config, url=database_url(config))

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Run the due janitor jobs once, publish the queue depth; return both."""
        results = self.janitor.run_once()
        values = queue_depth(self.janitor.queue.pool,
                             worker_live_seconds=self.config.janitor.worker_gone_seconds)
        namespace = self.config.janitor.cloudwatch_namespace
        if namespace:
            publish(values, namespace=namespace)
        log.info("janitor run: %s; queue: %s", results, values)
        return {"jobs": results, "queue": values}

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
