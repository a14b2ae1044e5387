"""Held connections: many live-log watchers and held downloads of one build.

For each gunicorn worker class (Kiln's gthread worker, then gevent), one API process
(``tests/service.py``'s ``KilnProcesses``: gunicorn, the synthetic module proxy, the process
sandbox, the shared test Go caches) on a fresh database with ``database.pool_max`` 4. A
worker registers its toolchain and leaves, so the build stays queued while N clients open
``GET /api/builds/{key}/events`` and N more ``GET /api/download`` for the same build (raw
sockets, one selector in this process). Held connections each keep a thread (gthread) or a
greenlet (gevent): the benchmark sets ``api.threads`` (and gunicorn's ``--threads``) to
2 N + 40 + probes, ``api.max_held`` and ``api.max_held_per_client`` to 2 N + 20 + probes
(every client comes from 127.0.0.1) and gunicorn's ``--worker-connections`` above 2 N.

Then, per worker class:

- a few more held downloads and streams are closed by their clients: the time until
  ``/metrics`` (``kiln_api_held_connections``) shows their slots given back;
- a worker starts and builds; meanwhile the API's connections in ``pg_stat_activity``
  (``application_name`` ``kiln-api%``) are sampled every 0.1 s; the database's transactions
  are ``pg_stat_database.xact_commit`` before the worker starts and after the last client
  is served (API, worker and everything else on that database; PostgreSQL publishes an
  idle backend's counts within 10 s, so a full run waits ``STATS_SETTLE_SECONDS`` before
  each reading);
- from the build's ``finished_at`` to the last watcher's ``result`` event and to the last
  held download's last byte (each checked: 200, the build's key, the artifact's length);
- the peak RSS (VmHWM) of the gunicorn worker process and its OS threads while holding.
"""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import socket
import statistics
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.infra import descendants, fresh_database, peak_rss_mib
from bench.real_bench import shared_test_cache
from bench.report import Figure, Results, Row
from kiln.db.migrate import Migrator
from kiln.standalone import WORKER_CLASS
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, wait_for

#: gunicorn worker classes: Kiln's gthread worker (as ``kiln serve`` runs it), then gevent's
WORKER_CLASSES = {"gthread": WORKER_CLASS, "gevent": "gevent"}
#: clients of each kind in a full run, and in a smoke run
CLIENTS = 1000
SMOKE_CLIENTS = 20
#: clients of each kind that hang up before the build, to time their release
PROBES = 10
SMOKE_PROBES = 2
POOL_MAX = 4
#: PostgreSQL publishes an idle backend's transaction counts within 10 s (PGSTAT_IDLE_INTERVAL)
STATS_SETTLE_SECONDS = 11.0
#: the build every client waits for: the same spec as a POST body and as a download query
SPEC = {"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
        "plugins": [f"{gp.HELLO}@v0.2.0"]}
DOWNLOAD_QUERY = urllib.parse.urlencode([("os", "linux"), ("arch", "amd64"),
                                         ("version", "v2.8.0"), ("p", f"{gp.HELLO}@v0.2.0")])
TIMEOUT_SECONDS = 600.0
#: build_logs.keepalive_seconds: the default in a full run (a stream whose client left is
#: let go when a keep-alive write fails); short in a smoke run, which must be quick
KEEPALIVE_SECONDS = 15.0
SMOKE_KEEPALIVE_SECONDS = 1.0


@dataclass
class Client:
    """One raw HTTP/1.1 connection and what came back on it."""

    sock: socket.socket
    kind: str  # "stream" or "download"
    head: bytes = b""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: int = 0
    text: bytes = b""
    done_at: float | None = None
    closed: bool = False

    def feed(self, data: bytes, now: float) -> None:
        """Take bytes from the server; note when the final event or last byte arrived."""
        if not self.status:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in
                            (line.partition(":") for line in lines[1:])}
        if self.kind == "stream":
            self.text += data
            at = self.text.find(b"event: result")
            if at >= 0 and b"\n\n" in self.text[at:] and self.done_at is None:
                self.done_at = now
        else:
            self.body += len(data)
            if self.body >= int(self.headers.get("content-length", "-1")) >= 0:
                self.done_at = self.done_at or now


class Crowd:
    """Many held connections to one API, served by one selector thread."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.sel = selectors.DefaultSelector()
        self.clients: list[Client] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="crowd", daemon=True)
        self.thread.start()

    def open(self, kind: str, count: int) -> list[Client]:
        """Open ``count`` connections of ``kind`` and send their requests."""
        target = (f"/api/builds/{self.key}/events" if kind == "stream"
                  else f"/api/download?{DOWNLOAD_QUERY}")
        request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Accept: text/event-stream, application/octet-stream\r\n\r\n").encode()
        opened = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            sock.sendall(request)
            sock.setblocking(False)
            opened.append(Client(sock, kind))
        # what the server sends meanwhile waits in the sockets' buffers
        with self.lock:
            for client in opened:
                self.sel.register(client.sock, selectors.EVENT_READ, client)
            self.clients += opened
        return opened

    def hang_up(self, clients: list[Client]) -> None:
        """Close connections as a client that goes away does (a FIN, nothing read after)."""
        with self.lock:
            for client in clients:
                self.sel.unregister(client.sock)
                client.sock.close()
                client.closed = True

    def _run(self) -> None:
        while not self.stopping:
            with self.lock:
                ready = self.sel.select(timeout=0.05) if self.sel.get_map() else []
                now = time.time()
                for sk, _ in ready:
                    client: Client = sk.data
                    try:
                        data = client.sock.recv(1 << 20)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        client.feed(data, now)
                    if not data or client.done_at is not None:
                        self.sel.unregister(client.sock)
                        client.sock.close()
                        client.closed = True
            if not ready:
                time.sleep(0.01)

    def served(self, kind: str) -> list[Client]:
        """Return the clients of ``kind`` that got everything."""
        with self.lock:
            return [c for c in self.clients if c.kind == kind and c.done_at is not None]

    def close(self) -> None:
        """Stop the selector thread and close every connection left."""
        self.stopping = True
        self.thread.join(5)
        for client in self.clients:
            if not client.closed:
                with contextlib.suppress(OSError):
                    client.sock.close()


def held_now(url: str) -> dict[str, int]:
    """Return the API process's held connections of each kind, from /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^kiln_api_held_connections\{kind="(\w+)"\} (\S+)$', text, re.M)}


def time_release(url: str, kind: str, before: int, gone: int,
                 hang_up: Callable[[], None]) -> float:
    """Hang up ``gone`` held connections of ``kind``; return seconds until their slots are back."""
    hang_up()
    started = time.monotonic()
    wait_for(f"{gone} {kind} slots given back",
             lambda: held_now(url).get(kind, before) <= before - gone, timeout=60,
             interval=0.02)
    return time.monotonic() - started


class Sampler:
    """Sample the API's database connections every 0.1 s from the server's own database."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.admin_url = admin_url
        self.dbname = dbname
        self.peak = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)

    def api_connections(self, conn: psycopg.Connection) -> int:
        """Return the API's connections to the database now."""
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %(db)s "
            "AND application_name LIKE 'kiln-api%%'", {"db": self.dbname}).fetchone()
        return int(row[0]) if row else 0

    def transactions(self) -> int:
        """Return the database's committed transactions so far."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %(db)s",
                               {"db": self.dbname}).fetchone()
        return int(row[0]) if row else 0

    def now(self) -> int:
        """Return the API's connections now."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            return self.api_connections(conn)

    def _run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self.stopping.wait(0.1):
                self.peak = max(self.peak, self.api_connections(conn))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)


def os_threads(pid: int) -> int:
    """Return a live process's OS threads."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^Threads:\s+(\d+)", text, re.M)
    return int(match.group(1)) if match else 0


def raise_open_files(needed: int) -> None:
    """Raise this process's open-file limit (its children inherit it) to ``needed`` if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def one_class(*, worker_class: str, server_url: str, root: Path, proxy_dir: Path,
              clients: int, probes: int, settle: float, keepalive: float,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """Hold ``clients`` watchers and downloads under one worker class; return its figures."""
    dbname = f"kiln_bench_watch_{worker_class}"
    db_url = fresh_database(server_url, dbname)
    with psycopg.connect(db_url, autocommit=True) as conn:
        Migrator(conn).migrate()
    held = 2 * (clients + probes)
    threads = held + 40
    kiln = KilnProcesses(db_url=db_url, root=root, goproxy=f"file://{proxy_dir}",
                         cache_dir=shared_test_cache(), env={
                             "KILN_DATABASE__POOL_MAX": str(POOL_MAX),
                             "KILN_LOGGING__LEVEL": "INFO",
                             "KILN_BUILD_LOGS__KEEPALIVE_SECONDS": f"{keepalive:g}",
                             "KILN_API__THREADS": str(threads),
                             "KILN_API__MAX_HELD": str(held + 20),
                             "KILN_API__MAX_HELD_PER_CLIENT": str(held + 20),
                             # no worker runs while the clients gather (a minute in a full
                             # run): held downloads must not give up on one (502)
                             "KILN_API__WORKER_WAIT": str(TIMEOUT_SECONDS),
                             "GUNICORN_CMD_ARGS": f"--worker-connections {threads + 100}"})
    crowd: Crowd | None = None
    try:
        # a worker registers the toolchain builds are keyed with, then leaves: the build
        # stays queued until every client is held
        kiln.start_worker("first", args=["--idle-exit", "0.1"])
        kiln.wait_for_worker("first")
        kiln.procs["first"].wait(30)
        kiln.start_api(threads=threads, worker_class=WORKER_CLASSES[worker_class])
        api_pid = kiln.procs["api"].pid
        resp = kiln.post_build(SPEC)
        resp.raise_for_status()
        key = resp.json()["key"]
        crowd = active = Crowd(kiln.port, key)
        streams = active.open("stream", clients + probes)
        downloads = active.open("download", clients + probes)
        want = {"stream": clients + probes, "download": clients + probes}
        wait_for(f"{held} held connections", lambda: held_now(kiln.url) == want,
                 timeout=TIMEOUT_SECONDS, interval=0.2)
        progress(f"watchers/{worker_class}: {clients + probes} streams and "
                 f"{clients + probes} downloads held")
        workers = descendants(api_pid)
        threads_held = {pid: os_threads(pid) for pid in workers}
        release = {
            "download": time_release(kiln.url, "download", want["download"], probes,
                                     lambda: active.hang_up(downloads[:probes])),
            "stream": time_release(kiln.url, "stream", want["stream"], probes,
                                   lambda: active.hang_up(streams[:probes])),
        }
        time.sleep(settle)
        sampler = Sampler(server_url, dbname)
        idle_connections = sampler.now()
        before = sampler.transactions()
        with sampler:
            kiln.start_worker()
            wait_for("every client served", lambda: len(active.served("stream")) >= clients
                     and len(active.served("download")) >= clients, timeout=TIMEOUT_SECONDS,
                     interval=0.2)
        # the worker's heartbeats and polls after the build are not the build's: it stops
        # (an exiting backend publishes its counts at once), the idle API's within 10 s
        kiln.stop("worker")
        time.sleep(settle)
        transactions = sampler.transactions() - before
        with psycopg.connect(db_url) as conn:
            row = conn.execute(
                "SELECT EXTRACT(EPOCH FROM started_at)::float8, "
                "EXTRACT(EPOCH FROM finished_at)::float8, state, artifact_size "
                "FROM kiln_builds WHERE key = %(k)s", {"k": key}).fetchone()
        assert row is not None
        started, finished, state, size = row
        served_streams = active.served("stream")
        served_downloads = active.served("download")
        good = [c for c in served_downloads if c.status == 200 and c.body == size
                and c.headers.get("x-kiln-build-key") == key]
        rss = {pid: peak_rss_mib(pid) or 0.0 for pid in workers}
        after_stream = [c.done_at - finished for c in served_streams if c.done_at]
        after_download = [c.done_at - finished for c in good if c.done_at]
        return {
            "worker_class": worker_class, "clients": clients, "probes": probes,
            "state": state, "build_seconds": finished - started, "artifact_bytes": size,
            "streams_served": len(served_streams), "downloads_served": len(good),
            "download_answers": dict(Counter(str(c.status) for c in served_downloads)),
            "api_connections_idle": idle_connections,
            "api_connections_peak": max(sampler.peak, idle_connections),
            "transactions": transactions, "stats_settled": settle > 0,
            "last_result_s": max(after_stream), "median_result_s": statistics.median(
                after_stream),
            "last_download_s": max(after_download) if after_download else None,
            "median_download_s": statistics.median(after_download) if after_download else None,
            "release_s": release, "api_processes": len(workers),
            "peak_rss_mib": max(rss.values()), "os_threads": max(threads_held.values()),
            "api_threads": threads, "keepalive_s": keepalive,
        }
    finally:
        if crowd is not None:
            crowd.close()
        kiln.close()


def run(*, server_url: str, root: Path, proxy_dir: Path, smoke: bool,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every worker class; return their figures."""
    clients = SMOKE_CLIENTS if smoke else CLIENTS
    probes = SMOKE_PROBES if smoke else PROBES
    # this process holds every client socket; gunicorn inherits the limit
    raise_open_files(8 * (clients + probes) + 1024)
    runs = []
    for worker_class in WORKER_CLASSES:
        runs.append(one_class(worker_class=worker_class, server_url=server_url,
                              root=root / worker_class, proxy_dir=proxy_dir, clients=clients,
                              probes=probes, settle=0.0 if smoke else STATS_SETTLE_SECONDS,
                              keepalive=SMOKE_KEEPALIVE_SECONDS if smoke
                              else KEEPALIVE_SECONDS, progress=progress))
        progress(f"watchers/{worker_class}: done")
    return {"runs": runs, "pool_max": POOL_MAX}


def rows(results: Results, data: dict[str, Any]) -> None:
    """Turn each worker class's figures into rows."""
    pool = data["pool_max"]
    for r in data["runs"]:
        n = r["clients"]
        what = (f"{n:,} live-log watchers + {n:,} held downloads of one build, one API "
                f"process, {r['worker_class']}")
        results.add(Row(
            f"{what}: database connections of the API", Figure.of(
                [r["api_connections_peak"]], "connections"),
            f"≤ {pool + 1} (database.pool_max {pool} + 1 LISTEN)",
            r["api_connections_peak"] <= pool + 1,
            note=f"the most seen in pg_stat_activity (application_name kiln-api…), sampled "
                 f"every 0.1 s during the build; {r['api_connections_idle']} while all waited"))
        results.add(Row(
            f"{what}: database transactions during the build",
            Figure.of([r["transactions"]], "transactions"), "reported", None,
            note="pg_stat_database xact_commit from the worker's start to the last client "
                 "served: the worker's, the API's, everything on that database"
                 + ("" if r["stats_settled"] else
                    " (smoke: read without waiting for PostgreSQL to publish the counts)")))
        results.add(Row(
            f"{what}: build finished → the last watcher's result event",
            Figure.of([r["last_result_s"]], "s"), "≤ 2 s, every watcher served",
            r["last_result_s"] <= 2.0 and r["streams_served"] == n,
            note=f"median {r['median_result_s']:.3f} s; {r['streams_served']}/{n} watchers "
                 f"got the result (the build's worker took {r['build_seconds']:.2f} s)"))
        size = r["artifact_bytes"]
        answers = ", ".join(f"{count} × {status}" for status, count in
                            sorted(r["download_answers"].items()))
        results.add(Row(
            f"{what}: build finished → the last held download's last byte",
            None if r["last_download_s"] is None else Figure.of([r["last_download_s"]], "s"),
            "every download served", r["downloads_served"] == n,
            note=("" if r["median_download_s"] is None else
                  f"median {r['median_download_s']:.3f} s; ")
                 + f"{r['downloads_served']}/{n} got 200 with the build's key and its "
                 f"{size / 1e6:.1f} MB binary ({r['downloads_served'] * size / 1e9:.1f} GB in "
                 f"all); answers: {answers}"))
        results.add(Row(
            f"{what}: peak RSS of the API process", Figure.of([r["peak_rss_mib"]], "MiB"),
            "reported", None,
            note=f"VmHWM of the gunicorn worker; {r['os_threads']} OS threads while holding "
                 f"(api.threads and --threads {r['api_threads']})"))
        results.add(Row(
            f"{r['worker_class']}: {r['probes']} held downloads whose clients hang up → "
            "their slots given back", Figure.of([r["release_s"]["download"]], "s"),
            "≤ 0.6 s (a 0.5 s tick)", r["release_s"]["download"] <= 0.6,
            note=f"until /metrics (kiln_api_held_connections, read every 0.02 s) shows all "
                 f"{r['probes']} released, while {n:,} others wait"))
        results.add(Row(
            f"{r['worker_class']}: {r['probes']} live-log streams whose clients hang up → "
            "their slots given back", Figure.of([r["release_s"]["stream"]], "s"),
            "reported", None,
            note=f"a stream notices when a keep-alive write fails "
                 f"(build_logs.keepalive_seconds {r['keepalive_s']:g} here)"))
