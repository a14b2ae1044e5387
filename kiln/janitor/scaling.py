"""What a worker autoscaler reads: the queue per toolchain, and its CloudWatch metrics.

A worker claims only builds keyed with its own toolchain (sandbox identity and Go version),
so queued builds of a toolchain no worker offers are no reason to add workers: the totals
count them apart, and every series is also published per toolchain. The Lambda janitor
(functions/janitor/lambda_handler.py) publishes them after each run; infra/k8s/worker.yaml's
KEDA trigger counts what ``QueuedBuilds`` counts (kiln/db/sql/metrics.sql).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg_pool import ConnectionPool

from kiln.db.metrics import MetricsTable

#: the per-toolchain series' dimensions (a toolchain: the sandbox identity and Go version a
#: build is keyed with, and a worker claims only builds keyed with its own)
SANDBOX, GO_VERSION = "Sandbox", "GoVersion"
#: the dimension value of a field that builds keyed before toolchains were do not name
UNRECORDED = "none"
#: metrics per PutMetricData call
BATCH = 20


def queue_by_toolchain(pool: ConnectionPool, *,
                       worker_live_seconds: float) -> list[dict[str, Any]]:
    """Return per toolchain: queued (claimable now), running, live slots, and offered."""
    return MetricsTable(pool).read("queue_by_toolchain", {"seconds": worker_live_seconds})


def queue_depth(toolchains: list[dict[str, Any]]) -> dict[str, float]:
    """Return the fleet's totals of the rows queue_by_toolchain gives.

    ``QueuedBuilds`` counts only the builds of toolchains the fleet offers (a live worker
    has it, or new builds are keyed with it): a worker added for any other would claim
    nothing. Those wait in ``UnclaimableBuilds`` until the janitor fails them.
    """
    return {
        "QueuedBuilds": sum(t["queued"] for t in toolchains if t["offered"]),
        "RunningBuilds": sum(t["running"] for t in toolchains),
        "WorkerSlots": sum(t["slots"] for t in toolchains),
        "UnclaimableBuilds": sum(t["queued"] for t in toolchains if not t["offered"]),
    }


def publish(values: dict[str, float], *, namespace: str,
            toolchains: Sequence[dict[str, Any]] = (), client: Any = None) -> None:
    """Put the totals into CloudWatch without dimensions, and per toolchain with them."""
    if client is None:
        import boto3

        client = boto3.client("cloudwatch")
    data: list[dict[str, Any]] = [
        {"MetricName": name, "Value": value, "Unit": "Count"} for name, value in values.items()
    ]
    for t in toolchains:
        dimensions = [{"Name": SANDBOX, "Value": t["sandbox"] or UNRECORDED},
                      {"Name": GO_VERSION, "Value": t["go_version"] or UNRECORDED}]
        data += [{"MetricName": name, "Dimensions": dimensions, "Value": float(t[field]),
                  "Unit": "Count"}
                 for name, field in (("QueuedBuilds", "queued"), ("RunningBuilds", "running"),
                                     ("WorkerSlots", "slots"))]
    for start in range(0, len(data), BATCH):
        client.put_metric_data(Namespace=namespace, MetricData=data[start:start + BATCH])
