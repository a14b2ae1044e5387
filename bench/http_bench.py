"""The HTTP side: cache-hit downloads beside nginx, lookups, dedup, and memory.

Kiln runs as in ``kiln serve``: gunicorn with kiln.standalone's settings (gthread,
``api.processes`` x ``api.threads``), a real worker (``python -m functions.worker``, process
sandbox, the synthetic module proxy), the local store, one PostgreSQL.

- cache-hit download: a succeeded build whose 40 MB artifact went through LocalStore.put;
  ``wrk -c 16`` GETs /api/builds/{key}/artifact, then the same file from nginx (sendfile).
- lookups: one request at a time on GET /api/builds/{key} (wrk -c 1) and on a cached
  /api/download: HEAD, as the website asks first (a Python client: wrk cannot time HEAD),
  and GET (wrk), which also sends the 1.6 MB binary.
- dedup: 200 clients GET /api/download for one uncached build at the same instant.
- memory: peak RSS (VmHWM) of the API's gunicorn workers and of the worker process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg.types.json import Jsonb

from bench.infra import (
    Child,
    base_env,
    bench_queries,
    descendants,
    free_port,
    latencies,
    peak_rss_mib,
    wait_http,
    wrk,
)
from kiln.artifacts.local import LocalStore
from kiln.artifacts.store import file_sha256
from kiln.config import DatabaseConfig, load_config
from kiln.db.builds import QueueManager
from kiln.db.migrate import Migrator
from kiln.db.pool import make_pool
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.standalone import gunicorn_command
from tests.fixtures import goproxy as gp

ARTIFACT_BYTES = 40 * 1024 * 1024
DOWNLOAD_CONNECTIONS = 16
DEDUP_CLIENTS = 200
#: one distinct uncached build per dedup run
DEDUP_PLUGINS = (
    [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"],
    [f"{gp.HELLO}@{gp.HELLO_VERSIONS[1]}"],
    [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}", f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[0]}"],
    [f"{gp.HELLO}@{gp.HELLO_VERSIONS[1]}", f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[1]}"],
)


def download_query(plugins: list[str]) -> str:
    """Return caddyserver.com's download query for linux/amd64 Caddy with ``plugins``."""
    pairs = [("os", "linux"), ("arch", "amd64"), ("version", "v2.8.4")]
    pairs += [("p", p) for p in plugins]
    return urllib.parse.urlencode(pairs)


class KilnHttp:
    """gunicorn + a worker against one database; helpers to plant and fetch builds."""

    def __init__(self, *, db_url: str, root: Path, proxy_dir: Path, cache_dir: Path,
                 logs: Path) -> None:
        self.db_url = db_url
        self.root = root
        self.logs = logs
        with psycopg.connect(db_url, autocommit=True) as conn:
            Migrator(conn).migrate()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = base_env(
            KILN_DATABASE__URL=db_url,
            KILN_BUILD__GOPROXY=f"file://{proxy_dir}",
            KILN_BUILD__GOSUMDB="off",
            KILN_BUILD__SANDBOX="process",
            KILN_BUILD__CACHE_DIR=str(cache_dir),
            KILN_BUILD__WORK_DIR=str(root / "work"),
            KILN_STORAGE__LOCAL__PATH=str(root / "artifacts"),
            KILN_API__LISTEN=f"127.0.0.1:{self.port}",
        )
        self.config = load_config(env=self.env)
        self.pool = make_pool(db_url, DatabaseConfig(), application="kiln-bench", min_size=1,
                              max_size=2)
        self.pool.wait()
        self.queue = QueueManager(self.pool)
        self.store = LocalStore(root / "artifacts")
        self.worker: Child | None = None
        self.api: Child | None = None

    def start(self) -> None:
        """Start the worker, wait until it registered, then the API."""
        import sys

        self.worker = Child("http-worker", [sys.executable, "-m", "functions.worker"],
                            env=self.env, logs=self.logs)
        deadline = time.monotonic() + 60
        while self.queue.toolchain(live_seconds=120) is None:
            if time.monotonic() > deadline or self.worker.proc.poll() is not None:
                raise RuntimeError(f"the worker did not register:\n{self.worker.log()[-3000:]}")
            time.sleep(0.2)
        self.api = Child("http-api", gunicorn_command(self.config), env=self.env,
                         logs=self.logs)
        wait_http(self.url + "/healthz", timeout=60)

    def plant(self, size: int) -> tuple[str, str]:
        """Store a ``size``-byte artifact through LocalStore and record a succeeded build."""
        toolchain = self.queue.toolchain(live_seconds=120)
        assert toolchain is not None
        sandbox, go_version = toolchain
        spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version="v2.8.4",
                         plugins=(ResolvedPlugin(package=gp.HELLO, module=gp.HELLO,
                                                 version="v0.0.0-bench." + str(size)),),
                         replacements=(), go_version=go_version, sandbox=sandbox)
        key = hashlib.sha256(f"bench-artifact-{size}".encode()).hexdigest()
        source = self.root / f"artifact-{size}"
        with source.open("wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
        digest = file_sha256(source)
        stored = self.store.put(key, spec.filename, source, sha256=digest)
        source.unlink()
        with self.pool.connection() as conn:
            conn.execute(bench_queries()["kiln_insert_succeeded"], {
                "key": key, "spec": Jsonb(spec.to_dict()), "artifact_path": stored.path,
                "artifact_size": stored.size, "artifact_sha256": digest})
        return key, str(self.store.root / stored.path)

    def peak_rss(self) -> dict[str, float]:
        """Return the peak RSS (MiB) of the busiest API process and of the worker."""
        found: dict[str, float] = {}
        if self.api is not None:
            workers = [p for p in descendants(self.api.proc.pid)]
            values = [v for v in (peak_rss_mib(p) for p in workers) if v is not None]
            if values:
                found["api"] = max(values)
        if self.worker is not None:
            value = peak_rss_mib(self.worker.proc.pid)
            if value is not None:
                found["worker"] = value
        return found

    def stop(self) -> None:
        """Stop the API and the worker."""
        for child in (self.api, self.worker):
            if child is not None:
                child.stop()
        self.pool.close()


class Nginx:
    """nginx serving one directory with sendfile, as a static file server is deployed."""

    def __init__(self, *, root_dir: Path, work: Path, logs: Path) -> None:
        import shutil

        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(exe).exists():
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root_dir};
    }}
}}
""")
        self.child = Child("nginx", [exe, "-c", str(conf), "-p", str(work)], env=base_env(),
                           logs=logs)
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url + "/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or self.child.proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {self.child.log()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.child.stop()


def _get_all(url: str, clients: int) -> list[tuple[int, str, str]]:
    """GET ``url`` from ``clients`` threads released at once; return (status, sha256, key)."""
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[int, str, str]:
        with requests.Session() as session:
            barrier.wait()
            resp = session.get(url, timeout=600)
            return (resp.status_code, hashlib.sha256(resp.content).hexdigest(),
                    resp.headers.get("X-Kiln-Build-Key", ""))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def dedup_run(kiln: KilnHttp, plugins: list[str]) -> dict[str, Any]:
    """Send DEDUP_CLIENTS identical uncached requests at once; count builds and answers."""
    url = f"{kiln.url}/api/download?{download_query(plugins)}"
    started = time.monotonic()
    answers = _get_all(url, DEDUP_CLIENTS)
    seconds = time.monotonic() - started
    keys = {k for _, _, k in answers}
    ok = [a for a in answers if a[0] == 200]
    key = next(iter(keys)) if len(keys) == 1 else ""
    builds = len(kiln.queue.attempts(key)) if key else -1
    row = kiln.queue.get(key) if key else None
    return {
        "plugins": plugins, "clients": DEDUP_CLIENTS, "served": len(ok),
        "statuses": sorted({a[0] for a in answers}),
        "distinct_bodies": len({a[1] for a in ok}),
        "matches_artifact": row is not None and all(a[1] == row.artifact_sha256 for a in ok),
        "keys": len(keys), "builds": builds, "seconds": seconds,
    }


def run(*, db_url: str, root: Path, proxy_dir: Path, cache_dir: Path, logs: Path,
        repeats: int, seconds: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the HTTP benchmarks; return raw figures."""
    out: dict[str, Any] = {"download": {"kiln": [], "nginx": []}, "lookup": {},
                           "dedup": [], "memory": {}}
    missing = [tool for tool in ("wrk", "nginx")
               if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()]
    out["missing"] = missing
    kiln = KilnHttp(db_url=db_url, root=root, proxy_dir=proxy_dir, cache_dir=cache_dir,
                    logs=logs)
    nginx: Nginx | None = None
    try:
        kiln.start()
        # dedup first: its builds are the cached ones the lookups ask for
        for r in range(repeats):
            result = dedup_run(kiln, DEDUP_PLUGINS[r % len(DEDUP_PLUGINS)])
            out["dedup"].append(result)
            progress(f"dedup run {r + 1}: {result['served']}/{result['clients']} served, "
                     f"{result['builds']} build(s), {result['seconds']:.1f}s")
        key, path = kiln.plant(ARTIFACT_BYTES)
        if missing:
            progress(f"not installed: {', '.join(missing)} (apt-get install -y wrk nginx); "
                     "the download and GET lookup figures are skipped")
            repeats_wrk = 0
        else:
            repeats_wrk = repeats
            nginx = Nginx(root_dir=kiln.store.root, work=root / "nginx", logs=logs)
        relative = Path(path).relative_to(kiln.store.root)
        urls = {"kiln": f"{kiln.url}/api/builds/{key}/artifact",
                "nginx": f"{nginx.url}/{relative}" if nginx else ""}
        for name, url in urls.items():  # both serve the same bytes
            if url:
                resp = requests.get(url, timeout=60)
                assert resp.status_code == 200 and len(resp.content) == ARTIFACT_BYTES, name
        for r in range(repeats_wrk):
            for name in (("kiln", "nginx") if r % 2 == 0 else ("nginx", "kiln")):
                result = wrk(urls[name], connections=DOWNLOAD_CONNECTIONS, seconds=seconds)
                if result["non_2xx"] or result["socket_errors"]:
                    raise RuntimeError(f"{name} download errors:\n{result['output']}")
                result.pop("output")
                out["download"][name].append(result)
                progress(f"download run {r + 1}, {name}: "
                         f"{result['bytes_per_s'] / 2**20:,.0f} MiB/s")
        cached = f"{kiln.url}/api/download?{download_query(DEDUP_PLUGINS[0])}"
        lookups = {
            "status": (f"{kiln.url}/api/builds/{key}", "GET"),
            "download_head": (cached, "HEAD"),
            "download_get": (cached, "GET"),
        }
        for name, (url, method) in lookups.items():
            if method == "GET" and missing:
                continue
            runs = []
            for _ in range(repeats):
                if method == "HEAD":
                    result = latencies(url, method=method, seconds=max(seconds / 2, 2))
                else:
                    result = wrk(url, connections=1, threads=1, seconds=max(seconds / 2, 2))
                if result["non_2xx"] or result["socket_errors"]:
                    raise RuntimeError(f"{name} lookup errors: {result.get('output', result)}")
                result.pop("output", None)
                runs.append(result)
            out["lookup"][name] = runs
            progress(f"{name} lookup: p50 " + ", ".join(f"{r['p50_ms']:.2f}" for r in runs)
                     + " ms")
        out["memory"] = kiln.peak_rss()
        out["artifact_bytes"] = ARTIFACT_BYTES
        out["api_processes"] = kiln.config.api.processes
        out["api_threads"] = kiln.config.api.threads
    finally:
        if nginx is not None:
            nginx.stop()
        kiln.stop()
    return out
