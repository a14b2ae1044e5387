"""Metrics for Prometheus at ``/metrics``: the same answer whichever API process is scraped.

Kiln runs as many API processes (gunicorn workers, replicas, function instances) and
workers, so per-process counters would show each scrape a random slice. Instead:

* gauges (builds by state, queue depth, workers alive) and the histogram of build attempt
  durations by outcome are read from PostgreSQL at scrape time;
* what only a process sees (HTTP latency by route, cache hits and misses, quota
  rejections, sandbox step durations) is counted in memory by a ``MetricsRecorder`` and
  added to the kiln_metrics table every few seconds, from which every scrape reads totals.

So any target gives the totals of the whole deployment: scrape one (or aggregate several
with ``max``, not ``sum``).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.db.builds import STATES
from kiln.db.metrics import MetricsTable

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
#: bucket bounds, seconds
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)
BUILD_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0,
                 3600.0)

#: what processes record: name → (type, help)
RECORDED: dict[str, tuple[str, str]] = {
    "kiln_http_request_duration_seconds": (
        "histogram", "Time to the response headers, by method, route template and status."),
    "kiln_build_requests_total": (
        "counter", "Build requests by result: hit (served from the store), miss (queued a "
                   "new build), joined (a build already queued or running), finished "
                   "(an earlier failure returned)."),
    "kiln_quota_rejections_total": (
        "counter", "Requests refused with 429, by limit (builds, requests) and principal."),
    "kiln_prebuilds_total": (
        "counter", "Builds the janitor asked for on a Caddy or plugin release, by result: "
                   "queued, hit (already built, queued or running), failed (refused)."),
    "kiln_build_step_duration_seconds": (
        "histogram", "Sandbox step durations by step (fetch, compile) and result "
                     "(ok, failed, timeout, cancelled, oom, pids, error)."),
    # the fleet build cache (kiln/buildcache/cache.py)
    "kiln_buildcache_gets_total": (
        "counter", "Go build cache lookups of compile steps by result: local (the worker's "
                   "disk), store (fetched from the fleet's store and checked), miss."),
    "kiln_buildcache_puts_total": ("counter", "Outputs compile steps put in the build cache."),
    "kiln_buildcache_published_total": (
        "counter", "Build cache entries shared with the fleet (by builds that succeeded)."),
    "kiln_buildcache_bytes_total": (
        "counter", "Build cache bytes by direction: fetched from or published to the store."),
    "kiln_buildcache_rejected_total": (
        "counter", "Stored build cache entries ignored as bad, by reason (entry, size, hash)."),
    "kiln_buildcache_prefetched_total": (
        "counter", "Build cache entries fetched from the store ahead of a compile, from the "
                   "manifest of an earlier build of the same key."),
    "kiln_buildcache_store_errors_total": (
        "counter", "Build cache store failures by operation (get, prefetch, publish): the workers "
                   "went on with their local caches."),
    # a worker's own disk (kiln/worker/trim.py)
    "kiln_worker_cache_trimmed_bytes_total": (
        "counter", "Bytes idle workers deleted from their Go caches to keep within "
                   "build.cache_max_bytes, by cache: modules (Go's module cache), gobuild "
                   "(Go's build cache), buildcache (the fleet build cache's local directory)."),
    # the fleet module cache (kiln/modproxy/cache.py)
    "kiln_modcache_requests_total": (
        "counter", "Module cache requests by result: hit (from the store), miss (fetched, "
                   "checked, stored), bypass (served from upstream unstored: store down or "
                   "unverifiable), passthrough (lists, @latest, sumdb), refused (checksum "
                   "mismatch), corrupt (a stored entry failed its size/hash check)."),
    "kiln_modcache_bytes_total": (
        "counter", "Bytes the module cache served, by source (store, upstream)."),
    "kiln_modcache_sets_total": (
        "counter", "Module sets (a spec's go.mod, go.sum and modules; kiln/modproxy/modsets.py) "
                   "by result: local (all modules on the worker already), restored (unpacked "
                   "from the store), miss, corrupt (deleted), error (store or disk), "
                   "published."),
}


@dataclass
class _Series:
    count: float = 0.0
    sum: float = 0.0
    bounds: tuple[float, ...] = ()
    buckets: list[float] = field(default_factory=list)


def _labels_key(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


class MetricsRecorder:
    """Count in memory; add the counts to kiln_metrics every ``flush_seconds``."""

    def __init__(self, pool: ConnectionPool, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.pool = pool
        self.table = MetricsTable(pool)
        self.flush_seconds = flush_seconds
        self._pending: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None:
        """Add ``amount`` to a counter."""
        with self._lock:
            series = self._pending.setdefault((name, _labels_key(labels)), _Series())
            series.count += amount

    def observe(self, name: str, labels: Mapping[str, str], value: float,
                buckets: Sequence[float]) -> None:
        """Record one observation of a histogram with the given bucket bounds."""
        bounds = tuple(buckets)
        index = next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))
        with self._lock:
            series = self._pending.setdefault((name, _labels_key(labels)), _Series())
            if series.bounds != bounds:
                series.bounds = bounds
                series.buckets = [0.0] * (len(bounds) + 1)
            series.count += 1
            series.sum += value
            series.buckets[index] += 1

    def flush(self) -> None:
        """Add pending counts to the database; keep them for the next try if that fails."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return
            rows = [
                {"name": name, "labels": Jsonb(json.loads(labels)), "count": s.count,
                 "sum": s.sum, "bounds": list(s.bounds), "buckets": s.buckets}
                for (name, labels), s in sorted(pending.items())  # one lock order everywhere
            ]
            try:
                self.table.add(rows)
            except (psycopg.Error, OSError) as exc:
                log.warning("cannot store metrics, keeping them for the next flush: %s", exc)
                with self._lock:
                    for key, series in pending.items():
                        self._merge(key, series)

    def _merge(self, key: tuple[str, str], old: _Series) -> None:
        series = self._pending.get(key)
        if series is None:
            self._pending[key] = old
            return
        series.count += old.count
        series.sum += old.sum
        if series.bounds == old.bounds:
            series.buckets = [a + b for a, b in zip(series.buckets, old.buckets, strict=True)]

    def start(self) -> MetricsRecorder:
        """Flush every ``flush_seconds`` in a daemon thread, and once more at exit."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kiln-metrics", daemon=True)
            self._thread.start()
            atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the flusher and flush what is left (unless the pool was closed first)."""
        self._stop.set()
        if self.pool.closed:
            return
        try:
            self.flush()
        except Exception:  # at exit the pool may already be closed
            log.debug("final metrics flush failed", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()


# -- the API side -------------------------------------------------------------------------


class KilnCollector(Collector):
    """Read every metric from the database at scrape time."""

    def __init__(self, pool: ConnectionPool, *, worker_live_seconds: float = 120.0) -> None:
        self.pool = pool
        self.table = MetricsTable(pool)
        self.worker_live_seconds = worker_live_seconds

    def _rows(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.table.read(name, params)

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges, the attempt histogram and the recorded series."""
        by_state = {r["state"]: r["count"] for r in self._rows("builds_by_state")}
        builds = GaugeMetricFamily("kiln_builds", "Builds by state.", labels=["state"])
        for state in STATES:
            builds.add_metric([state], by_state.get(state, 0))
        yield builds

        queue = self._rows("queue")[0]
        # a worker claims only builds keyed with its toolchain: builds of one the fleet does
        # not offer are no work for it (an autoscaler must not add workers for them)
        toolchains = self._rows("queue_by_toolchain", {"seconds": self.worker_live_seconds})
        yield GaugeMetricFamily(
            "kiln_queue_depth", "Queued builds a worker of the fleet could claim now.",
            value=sum(t["queued"] for t in toolchains if t["offered"]))
        yield GaugeMetricFamily(
            "kiln_queue_unclaimable",
            "Queued builds keyed with a toolchain no live worker offers (the janitor fails "
            "them after janitor.unclaimable_after).",
            value=sum(t["queued"] for t in toolchains if not t["offered"]))
        yield GaugeMetricFamily("kiln_queue_delayed",
                                "Queued builds waiting for a retry's backoff.",
                                value=queue["delayed"])
        yield GaugeMetricFamily("kiln_queue_oldest_seconds",
                                "How long the oldest claimable build has waited.",
                                value=queue["oldest_seconds"])

        workers = self._rows("workers", {"seconds": self.worker_live_seconds})[0]
        yield GaugeMetricFamily("kiln_workers_alive",
                                "Active workers with a recent heartbeat.", value=workers["alive"])
        yield GaugeMetricFamily("kiln_worker_slots",
                                "Builds the alive workers can run at once.",
                                value=workers["alive_slots"])
        by_worker_state = GaugeMetricFamily("kiln_workers", "Registered workers by state.",
                                            labels=["state"])
        for state in ("active", "draining", "gone"):
            by_worker_state.add_metric([state], workers[state])
        yield by_worker_state

        yield self._attempt_durations()
        yield from self._recorded()

    def _attempt_durations(self) -> Metric:
        family = HistogramMetricFamily(
            "kiln_build_duration_seconds",
            "Duration of finished build attempts by outcome (succeeded, failed, cancelled, "
            "lost, preempted).", labels=["outcome"])
        per_outcome: dict[str, tuple[list[float], float]] = {}
        for row in self._rows("attempt_durations", {"bounds": list(BUILD_BUCKETS)}):
            counts, total = per_outcome.get(row["outcome"],
                                            ([0.0] * (len(BUILD_BUCKETS) + 1), 0.0))
            # width_bucket's bucket i (durations from bound i-1) is Prometheus's le=bound i
            counts[min(int(row["bucket"]), len(BUILD_BUCKETS))] += row["count"]
            per_outcome[row["outcome"]] = (counts, total + float(row["sum"] or 0.0))
        for outcome, (counts, total) in sorted(per_outcome.items()):
            family.add_metric([outcome], _cumulative(BUILD_BUCKETS, counts), total)
        return family

    def _recorded(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for row in self._rows("recorded"):
            name = row["name"]
            kind, doc = RECORDED.get(name, ("counter" if not row["bounds"] else "histogram",
                                            name))
            labels: dict[str, str] = row["labels"]
            names = sorted(labels)
            family = families.get(name)
            if family is None:
                if kind == "histogram":
                    family = HistogramMetricFamily(name, doc, labels=names)
                else:
                    family = CounterMetricFamily(name, doc, labels=names)
                families[name] = family
            values = [str(labels[n]) for n in names]
            if isinstance(family, HistogramMetricFamily):
                family.add_metric(values, _cumulative(row["bounds"], row["buckets"]), row["sum"])
            else:
                assert isinstance(family, CounterMetricFamily)
                family.add_metric(values, row["count"])
        # a family with no series yet is still announced, with its help text
        for name, (kind, doc) in RECORDED.items():
            if name not in families:
                families[name] = (HistogramMetricFamily(name, doc) if kind == "histogram"
                                  else CounterMetricFamily(name, doc))
        yield from families.values()


def _cumulative(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    """Turn per-bucket counts (last: above every bound) into Prometheus's cumulative buckets."""
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in zip([*bounds, float("inf")], counts, strict=False):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


# -- the worker side ----------------------------------------------------------------------
