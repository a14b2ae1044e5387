"""Wake-up latency and claim throughput: Kiln's queue beside procrastinate's, same server.

Both sides run real worker processes (bench.kiln_worker, bench.procrastinate_worker) with a
no-op job, against their own database on one PostgreSQL server.

- wake-up: an idle worker waits; the benchmark commits one enqueue and notes when the commit
  returned; the worker notes when its claim returned (``time.monotonic()``, one clock for
  every process of the machine). Then it waits until the worker is idle again, and repeats.
- throughput: K worker processes wait, idle; one transaction queues N jobs (with a NOTIFY
  each); the figure is N over the time from that commit to the last job's completion
  (both from PostgreSQL's clock, which is the machine's).
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from bench.infra import Child, Postgres, base_env, bench_queries, cpu_seconds, peak_rss_mib
from bench.report import percentile
from kiln.config import DatabaseConfig
from kiln.db.builds import QueueManager
from kiln.db.migrate import Migrator
from kiln.db.pool import make_pool
from kiln.db.sql import queries
from kiln.request.spec import BuildSpec, ResolvedPlugin

#: seconds a worker process may take to start and LISTEN
START_TIMEOUT = 60.0
#: concurrency of every worker process in the throughput runs, Kiln's and procrastinate's
THROUGHPUT_CONCURRENCY = 4
#: procrastinate with asynchronous commit, as Kiln's worker commits (throughput only)
ASYNC_PEER = "procrastinate (synchronous_commit=off)"
#: concurrency in the wake-up runs (one job at a time anyway)
WAKEUP_CONCURRENCY = 1


def noop_spec() -> dict[str, Any]:
    """Return a valid build spec for the no-op worker (its bytes do not matter)."""
    return BuildSpec(
        os="linux", arch="amd64", arm="", caddy_version="v2.8.4",
        plugins=(ResolvedPlugin(package="github.com/kiln-fixtures/hello",
                                module="github.com/kiln-fixtures/hello", version="v0.1.0"),),
        replacements=(), go_version="go1.27.3", sandbox="bench:noop",
    ).to_dict()


def make_keys(prefix: str, count: int) -> list[str]:
    """Return ``count`` distinct build keys."""
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(count)]


class Side(Protocol):
    name: str

    def worker(self, name: str, *, concurrency: int, events: bool) -> Child: ...

    def enqueue_one(self, tag: str) -> str: ...

    def fill(self, tag: str, count: int) -> tuple[list[Any], float]: ...

    def progress(self, ids: list[Any]) -> tuple[int, float | None]: ...

    def close(self) -> None: ...


class KilnSide:
    """Kiln: QueueManager.enqueue (the API's path) and bench.kiln_worker."""

    name = "Kiln"

    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        with psycopg.connect(url, autocommit=True) as conn:
            Migrator(conn).migrate()
        self.pool = make_pool(url, DatabaseConfig(), application="kiln-bench", min_size=1,
                              max_size=2)
        self.pool.wait()
        self.queue = QueueManager(self.pool)
        self.spec = noop_spec()

    def worker(self, name: str, *, concurrency: int, events: bool) -> Child:
        argv = [sys.executable, "-m", "bench.kiln_worker", self.url,
                "--concurrency", str(concurrency)] + (["--events"] if events else [])
        return Child(name, argv, env=base_env(), logs=self.logs, events=True)

    def enqueue_one(self, tag: str) -> str:
        key = make_keys(tag, 1)[0]
        self.queue.enqueue(key, self.spec)
        return key

    def fill(self, tag: str, count: int) -> tuple[list[Any], float]:
        keys = make_keys(tag, count)
        spec = Jsonb(self.spec)
        rows = [{"key": k, "spec": spec, "priority": 0, "max_attempts": 3,
                 "requested_by": None} for k in keys]
        # QueueManager.enqueue's queries, N at once in one transaction
        with self.pool.connection() as conn:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(queries()["enqueue"], rows)
                cur.executemany(queries()["notify_queued"], [{"key": k} for k in keys])
            committed = time.time()
        return list(keys), committed

    def progress(self, ids: list[Any]) -> tuple[int, float | None]:
        with self.pool.connection() as conn:
            row = conn.execute(bench_queries()["kiln_progress"], {"keys": ids}).fetchone()
        assert row is not None
        return int(row[0]), row[1]

    def close(self) -> None:
        self.pool.close()


class ProcrastinateSide:
    """procrastinate: Task.defer / batch_defer and its worker, in its own database."""

    name = "procrastinate"

    def __init__(self, url: str, logs: Path, *, async_commit: bool = False) -> None:
        import procrastinate

        from bench.procrastinate_worker import TASK, make_app

        self.url = url
        self.logs = logs
        self.async_commit = async_commit
        if async_commit:
            self.name = ASYNC_PEER
        self.app = make_app(procrastinate.SyncPsycopgConnector(conninfo=url))
        self.app.open()
        if not async_commit:  # the async-commit peer shares the first one's database
            self.app.schema_manager.apply_schema()
        self.task = self.app.tasks[TASK]

    def worker(self, name: str, *, concurrency: int, events: bool) -> Child:
        argv = [sys.executable, "-m", "bench.procrastinate_worker", self.url,
                "--concurrency", str(concurrency)] + (["--events"] if events else []) + (
                    ["--async-commit"] if self.async_commit else [])
        return Child(name, argv, env=base_env(), logs=self.logs, events=True)

    def enqueue_one(self, tag: str) -> str:
        return str(self.task.defer())

    def fill(self, tag: str, count: int) -> tuple[list[Any], float]:
        args: list[Any] = [{"i": i} for i in range(count)]
        ids = self.task.batch_defer(*args)
        return [int(i) for i in ids], time.time()

    def progress(self, ids: list[Any]) -> tuple[int, float | None]:
        with psycopg.connect(self.url) as conn:
            row = conn.execute(bench_queries()["procrastinate_progress"],
                               {"ids": ids}).fetchone()
        assert row is not None
        return int(row[0]), row[1]

    def close(self) -> None:
        self.app.close()


def _wait_listening(workers: list[Child]) -> None:
    for w in workers:
        w.wait_event(lambda e: e["event"] == "listening", START_TIMEOUT)
    time.sleep(0.3)  # let the first (empty) claims settle
    for w in workers:
        w.drain()


def _claimed(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "claim" and key in e["keys"]


def _notified(payload: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "notify" and e["key"] == payload


def _completed(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "complete" and e["key"] == key


def wakeup_run(side: Side, *, samples: int, tag: str,
               progress: Callable[[str], None]) -> list[float]:
    """Return ``samples`` wake-up latencies (ms) of one idle worker."""
    worker = side.worker(f"{side.name}-wakeup-{tag}", concurrency=WAKEUP_CONCURRENCY,
                         events=True)
    try:
        _wait_listening([worker])
        latencies = []
        for i in range(samples):
            time.sleep(random.uniform(0.002, 0.006))  # idle, and not in step with anything
            key = side.enqueue_one(f"{tag}-{i}")
            committed = time.monotonic()
            claim = worker.wait_event(_claimed(key), 10)
            latencies.append((claim["t"] - committed) * 1000)
            worker.wait_event(_completed(key), 10)
            # idle again: the claim loop's empty claim after the completion
            worker.wait_event(lambda e: e["event"] == "claim" and not e["keys"], 10)
        return latencies
    finally:
        worker.stop()


@dataclass
class ThroughputRuns:
    """Jobs/s per run, CPU milliseconds per job per run, peak RSS of the busiest worker."""

    rates: list[float] = field(default_factory=list)
    worker_cpu_ms: list[float] = field(default_factory=list)
    #: the server's CPU per job, queueing the jobs included (empty: not measurable)
    server_cpu_ms: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0


def floor_run(url: str, *, samples: int, logs: Path) -> list[float]:
    """Return ``samples`` latencies (ms) from a committed NOTIFY to a bare LISTEN client."""
    listener = Child("notify-floor", [sys.executable, "-m", "bench.notify_floor", url],
                     env=base_env(), logs=logs, events=True)
    try:
        listener.wait_event(lambda e: e["event"] == "listening", START_TIMEOUT)
        latencies = []
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(samples):
                time.sleep(random.uniform(0.002, 0.006))
                conn.execute(bench_queries()["floor_notify"], {"payload": str(i)})
                committed = time.monotonic()
                event = listener.wait_event(_notified(str(i)), 10)
                latencies.append((event["t"] - committed) * 1000)
        return latencies
    finally:
        listener.stop()


def throughput_runs(side: Side, *, workers: int, jobs: int, repeats: int, tag: str,
                    progress: Callable[[str], None], pg: Postgres) -> ThroughputRuns:
    """Measure ``repeats`` runs with ``workers`` idle worker processes."""
    procs = [side.worker(f"{side.name}-tput-{tag}-{workers}w-{n}",
                         concurrency=THROUGHPUT_CONCURRENCY, events=False)
             for n in range(workers)]
    out = ThroughputRuns()
    try:
        _wait_listening(procs)
        for r in range(repeats):
            worker_cpu = sum(cpu_seconds(p.proc.pid) or 0.0 for p in procs)
            server_cpu = pg.cpu_seconds()
            ids, committed = side.fill(f"{tag}-{workers}-{r}", jobs)
            deadline = time.monotonic() + max(120.0, jobs / 50)
            while True:
                done, last = side.progress(ids)
                if done >= len(ids):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{side.name}: only {done}/{len(ids)} jobs done")
                time.sleep(0.1)
            assert last is not None
            out.worker_cpu_ms.append(
                (sum(cpu_seconds(p.proc.pid) or 0.0 for p in procs) - worker_cpu) * 1000 / jobs)
            server_after = pg.cpu_seconds()
            if server_cpu is not None and server_after is not None:
                out.server_cpu_ms.append((server_after - server_cpu) * 1000 / jobs)
            out.rates.append(jobs / max(last - committed, 1e-6))
            progress(f"{side.name} throughput, {workers} worker(s): {out.rates[-1]:,.0f}/s, "
                     f"CPU per job: workers {out.worker_cpu_ms[-1]:.2f} ms"
                     + (f", server {out.server_cpu_ms[-1]:.2f} ms" if out.server_cpu_ms else ""))
            time.sleep(0.5)
        out.peak_rss_mib = max(peak_rss_mib(p.proc.pid) or 0.0 for p in procs)
    finally:
        for p in procs:
            p.stop()
    return out


@dataclass
class QueueFigures:
    #: side -> one list of latencies (ms) per run
    wakeup: dict[str, list[list[float]]]
    #: a bare LISTEN client's latencies (ms) per run, in the same minutes (the floor)
    floor: list[list[float]]
    #: side -> worker processes -> runs
    throughput: dict[str, dict[int, ThroughputRuns]]


def peer_missing() -> str:
    """Return why procrastinate cannot run here, or "" when it can."""
    import importlib.util

    if importlib.util.find_spec("procrastinate") is None:
        return "procrastinate is not installed (pip install -e '.[bench]', as make bench does)"
    return ""


def run(*, kiln_url: str, procrastinate_url: str, logs: Path, samples: int, repeats: int,
        jobs: int, worker_counts: tuple[int, ...], progress: Callable[[str], None],
        pg: Postgres, peer: bool = True) -> QueueFigures:
    """Run both benchmarks on both sides (Kiln's alone without ``peer``); return raw figures."""
    sides: list[Side] = [KilnSide(kiln_url, logs)]
    async_peer: ProcrastinateSide | None = None
    if peer:
        sides.append(ProcrastinateSide(procrastinate_url, logs))
        async_peer = ProcrastinateSide(procrastinate_url, logs, async_commit=True)
    peers: list[Side] = [*sides, *([async_peer] if async_peer is not None else [])]
    wakeup: dict[str, list[list[float]]] = {s.name: [] for s in sides}
    throughput: dict[str, dict[int, ThroughputRuns]] = {s.name: {} for s in peers}
    floor: list[list[float]] = []
    try:
        for r in range(repeats):
            floor.append(floor_run(kiln_url, samples=samples, logs=logs))
            progress(f"bare LISTEN client run {r + 1}: p50 {percentile(floor[-1], 50):.2f} "
                     f"ms, p99 {percentile(floor[-1], 99):.2f} ms")
            # alternate the order so that neither side always runs on a warmer machine
            for side in sides if r % 2 == 0 else sides[::-1]:
                lat = wakeup_run(side, samples=samples, tag=f"wake-{r}", progress=progress)
                wakeup[side.name].append(lat)
                progress(f"{side.name} wake-up run {r + 1}: p50 {percentile(lat, 50):.2f} ms, "
                         f"p99 {percentile(lat, 99):.2f} ms")
        for count in worker_counts:
            for side in sides:
                throughput[side.name][count] = throughput_runs(
                    side, workers=count, jobs=jobs, repeats=repeats, tag="tput",
                    progress=progress, pg=pg)
        # the same durability trade-off as Kiln's worker, for reference, at the top count
        top = max(worker_counts)
        if async_peer is not None:
            throughput[async_peer.name][top] = throughput_runs(
                async_peer, workers=top, jobs=jobs, repeats=repeats, tag="tput-async",
                progress=progress, pg=pg)
    finally:
        for s in peers:
            s.close()
    return QueueFigures(wakeup=wakeup, floor=floor, throughput=throughput)
