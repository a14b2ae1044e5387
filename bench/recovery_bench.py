"""Recovery: how long a build, the API and the workers take to get over a failure.

One Kiln (``tests/service.py``'s ``KilnProcesses``: gunicorn, a janitor requeueing expired
leases every second, workers with the process sandbox and the synthetic module proxy) on a
PostgreSQL server of its own (``tests/processes.py``'s ``PgCluster``), with the end-to-end
tests' settings: lease 5 s, heartbeat 1 s. Each run, with a build of its own:

- **kill -9**: a worker with empty Go caches (its build is still running) claims a build
  and is killed with SIGKILL (its sandbox's steps too, as the machine would); a warm
  worker starts at once. Seconds from the kill until the build is requeued (its attempt
  recorded ``lost``), and until it succeeded on the second attempt.
- **preemption**: the same, but the worker gets SIGUSR1 (a spot notice: Kiln treats
  SIGTERM, SIGUSR1 and the clouds' metadata notices alike). Seconds until the build is
  back in the queue (without spending an attempt), until the worker has drained and
  exited 0, and until the warm worker finished the build. Then again with the notice in a
  fake metadata server (``tests/metadata.py``) that the worker polls every second: AWS,
  GCE and Azure in turn, one per run.
- **PostgreSQL restart**: the server is stopped (``pg_ctl -m fast``) under an idle service
  whose worker polls only every 600 s (so only a re-``LISTEN`` wakes it); ``GET /healthz``,
  ``GET /api/builds/{key}`` and ``POST /api/builds`` are timed during the outage; after
  3 s it starts again: seconds until ``/healthz`` answers 200, and until a build posted
  then is claimed by the worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.infra import remove_tree
from bench.report import Figure, Results, Row
from kiln.db.migrate import Migrator
from tests.fixtures import goproxy as gp
from tests.metadata import MetadataState, serving
from tests.processes import (
    PgCluster,
    ensure_worker,
    kill_sandbox_processes,
    start_without_a_worker,
)
from tests.service import KilnProcesses, wait_for

#: the end-to-end tests' settings (tests/service.py), on top of which the janitor requeues
#: expired leases every second
LEASE_SECONDS = 5
HEARTBEAT_SECONDS = 1
REQUEUE_INTERVAL = 1
#: the defaults, for the bounds the rows quote
DEFAULT_LEASE_SECONDS = 60
DEFAULT_REQUEUE_INTERVAL = 10
OUTAGE_SECONDS = 3.0
#: the metadata notices, one provider per run in turn, and how often the worker polls
PROVIDERS = ("aws", "gce", "azure")
METADATA_POLL_SECONDS = 1.0
#: one build per scenario and run, new to the instance: a Caddy version per scenario,
#: plugins per run (so at most this many runs)
PLUGIN_SETS = ([f"{gp.HELLO}@v0.1.0"], [f"{gp.HELLO}@v0.2.0"],
               [f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[0]}"])
#: the builds posted after a PostgreSQL restart
AFTER_RESTART = ([f"{gp.HELLO}@v0.1.0", f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[0]}"],
                 [f"{gp.HELLO}@v0.2.0", f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[1]}"],
                 [f"{gp.HELLO}@v0.1.0", f"{gp.DNS_PACKAGE}@{gp.DNS_VERSIONS[1]}"])
TIMEOUT_SECONDS = 180.0


def spec(scenario: int, run: int) -> dict[str, Any]:
    """Return the build of one scenario's run (each is new to the instance)."""
    return {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_RELEASES[scenario],
            "plugins": PLUGIN_SETS[run % len(PLUGIN_SETS)]}


def query(kiln: KilnProcesses, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Run one query on the instance's database."""
    with psycopg.connect(kiln.db_url) as conn:
        return conn.execute(sql, params or {}).fetchall()


def victim_claims(kiln: KilnProcesses, name: str, body: dict[str, Any], root: Path,
                  env: dict[str, str] | None = None) -> tuple[Any, str]:
    """Start a worker with empty Go caches alone, post ``body``; return it once it runs it."""
    kiln.stop("warm")  # the build must go to the victim
    proc = kiln.start_worker(name, env={"KILN_WORKER__ID": name,
                                        "KILN_BUILD__CACHE_DIR": str(root / name),
                                        **(env or {})})
    kiln.wait_for_worker(name)
    resp = kiln.post_build(body)
    resp.raise_for_status()
    key = resp.json()["key"]
    wait_for(f"{name} to claim the build", lambda: query(
        kiln, "SELECT 1 FROM kiln_builds WHERE key = %(k)s AND worker_id = %(w)s "
              "AND state = 'running'", {"k": key, "w": name}), timeout=TIMEOUT_SECONDS,
        interval=0.02)
    return proc, key


def kill_run(kiln: KilnProcesses, run: int, root: Path) -> dict[str, float]:
    """SIGKILL a worker mid-build; time the requeue and the completion elsewhere."""
    proc, key = victim_claims(kiln, f"victim-{run}", spec(0, run), root)
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    kill_sandbox_processes(key)  # the process sandbox's steps outlive their worker
    proc.wait(10)
    ensure_worker(kiln)
    wait_for("the expired lease to be requeued", lambda: query(
        kiln, "SELECT 1 FROM kiln_attempts WHERE build_key = %(k)s AND outcome = 'lost'",
        {"k": key}), timeout=TIMEOUT_SECONDS, interval=0.02)
    requeued = time.monotonic() - killed
    final = kiln.wait_build(key, timeout=TIMEOUT_SECONDS)
    if final["state"] != "succeeded" or final["attempts"] != 2:
        raise RuntimeError(f"kill -9: build {key} ended {final['state']} after "
                           f"{final['attempts']} attempts")
    return {"requeued_s": requeued, "completed_s": time.monotonic() - killed}


def preemption_run(kiln: KilnProcesses, run: int, root: Path, *,
                   metadata: tuple[str, MetadataState] | None = None) -> dict[str, Any]:
    """Give a worker a notice mid-build; time the hand-back, its exit, the completion.

    The notice is SIGUSR1, or with ``metadata`` the preemption its fake metadata server
    then reports, to the provider of this run (AWS, GCE, Azure in turn).
    """
    provider = PROVIDERS[run % len(PROVIDERS)] if metadata else "signal"
    env = {"KILN_WORKER__PREEMPTION__PROVIDERS": "[]"}
    body = spec(1, run)
    if metadata is not None:
        url, state = metadata
        state.reset()
        env = {"KILN_WORKER__PREEMPTION__PROVIDERS": f"[{provider}]",
               "KILN_WORKER__PREEMPTION__POLL_SECONDS": str(METADATA_POLL_SECONDS),
               **{f"KILN_WORKER__PREEMPTION__{name}_URL": url
                  for name in ("AWS", "GCE", "AZURE")}}
        body = {**body, "arch": "arm64"}
    proc, key = victim_claims(kiln, f"spot-{provider}-{run}", body, root, env=env)
    if metadata is None:
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        with metadata[1].lock:
            metadata[1].preempted = True
    noticed = time.monotonic()
    wait_for("the build handed back", lambda: query(
        kiln, "SELECT 1 FROM kiln_builds WHERE key = %(k)s AND state = 'queued' "
              "AND worker_id IS NULL", {"k": key}), timeout=60, interval=0.01)
    handed_back = time.monotonic() - noticed
    code = proc.wait(60)
    exited = time.monotonic() - noticed
    if code != 0:
        raise RuntimeError(f"the preempted worker exited {code}")
    ensure_worker(kiln)
    final = kiln.wait_build(key, timeout=TIMEOUT_SECONDS)
    outcomes = [a["outcome"] for a in final["attempt_history"]]
    if final["state"] != "succeeded" or outcomes != ["preempted", "succeeded"]:
        raise RuntimeError(f"preemption: build {key} ended {final['state']}, {outcomes}")
    return {"provider": provider, "handed_back_s": handed_back, "exited_s": exited,
            "completed_s": time.monotonic() - noticed}


def timed(call: Callable[[], requests.Response]) -> dict[str, Any]:
    """Return a request's status, seconds and whether it said when to retry."""
    started = time.monotonic()
    resp = call()
    return {"status": resp.status_code, "seconds": time.monotonic() - started,
            "retry_after": "Retry-After" in resp.headers}


def restart_run(kiln: KilnProcesses, pg: PgCluster, run: int) -> dict[str, Any]:
    """Stop PostgreSQL under an idle service, start it again; time the way back."""
    kiln.stop("warm")
    ensure_worker(kiln, "listener")
    done = kiln.post_build(spec(2, run))
    done.raise_for_status()
    key = done.json()["key"]
    kiln.wait_build(key, timeout=TIMEOUT_SECONDS)
    pg.stop()
    stopped = time.monotonic()
    during = {
        "healthz": timed(lambda: requests.get(kiln.url + "/healthz", timeout=60)),
        "status": timed(lambda: requests.get(f"{kiln.url}/api/builds/{key}", timeout=60)),
        "post": timed(lambda: kiln.post_build({**spec(2, run), "arch": "arm64"})),
    }
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
    pg.start()
    restarted = time.monotonic()
    kiln.wait_healthy(timeout=TIMEOUT_SECONDS)
    healthy = time.monotonic() - restarted

    def post() -> str | None:
        resp = kiln.post_build({**spec(2, run), "plugins": AFTER_RESTART[run]})
        return resp.json()["key"] if resp.status_code in (200, 202) else None

    new = wait_for("a POST accepted", post, timeout=TIMEOUT_SECONDS)
    posted = time.monotonic() - restarted
    wait_for("the worker to claim the new build", lambda: query(
        kiln, "SELECT 1 FROM kiln_builds WHERE key = %(k)s AND started_at IS NOT NULL",
        {"k": new}), timeout=TIMEOUT_SECONDS, interval=0.02)
    claimed = time.monotonic() - restarted
    final = kiln.wait_build(new, timeout=TIMEOUT_SECONDS)
    if final["state"] != "succeeded":
        raise RuntimeError(f"after the restart: build {new} ended {final['state']}")
    return {"during": during,
            "healthy_s": healthy, "posted_s": posted, "claimed_s": claimed}


def run(*, root: Path, proxy_dir: Path, cache_dir: Path, repeats: int, smoke: bool,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every scenario ``repeats`` times (at most 3); return their figures.

    A smoke run leaves out the SIGUSR1 notice, to be quick.
    """
    repeats = min(repeats, len(PLUGIN_SETS))
    # outside any private directory: postgres runs as an unprivileged system user
    pg_root = Path(tempfile.mkdtemp(prefix="kiln-bench-recovery-pg-"))
    pg_root.chmod(0o755)
    pg = PgCluster(pg_root)
    pg.start()
    kiln = KilnProcesses(db_url=pg.url, root=root, goproxy=f"file://{proxy_dir}",
                         cache_dir=cache_dir, env={
                             "KILN_JANITOR__REQUEUE_INTERVAL": str(REQUEUE_INTERVAL),
                             "KILN_WORKER__LEASE_SECONDS": str(LEASE_SECONDS),
                             "KILN_WORKER__HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
                             "KILN_LOGGING__LEVEL": "INFO"})
    data: dict[str, Any] = {"kill": [], "preemption": [], "metadata": [], "restart": [],
                            "lease_seconds": LEASE_SECONDS, "requeue_interval": REQUEUE_INTERVAL,
                            "outage_seconds": OUTAGE_SECONDS}
    try:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            Migrator(conn).migrate()
        start_without_a_worker(kiln)
        with serving() as metadata:
            for number in range(repeats):
                data["kill"].append(kill_run(kiln, number, root / "cold"))
                progress(f"recovery: kill -9 run {number + 1}: {data['kill'][-1]}")
                if not smoke:  # the metadata notice below takes the same way
                    data["preemption"].append(preemption_run(kiln, number, root / "cold"))
                    progress(f"recovery: SIGUSR1 run {number + 1}: {data['preemption'][-1]}")
                data["metadata"].append(preemption_run(kiln, number, root / "cold",
                                                       metadata=metadata))
                progress(f"recovery: metadata notice run {number + 1}: "
                         f"{data['metadata'][-1]}")
        # a worker that only a notification wakes: env of its own, started on first use
        kiln.env["KILN_WORKER__POLL_SECONDS"] = "600"
        for number in range(repeats):
            data["restart"].append(restart_run(kiln, pg, number))
            progress(f"recovery: PostgreSQL restart run {number + 1}: "
                     f"healthy {data['restart'][-1]['healthy_s']:.2f}s")
        for name in ("api", "janitor", "listener"):
            proc = kiln.procs.get(name)
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{name} died:\n{kiln.log(name)[-3000:]}")
    finally:
        kiln.close()
        pg.kill()
        shutil.rmtree(pg_root, ignore_errors=True)
        remove_tree(root / "cold")
    return data


def rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the recovery runs into rows."""
    lease, every = data["lease_seconds"], data["requeue_interval"]
    settings = f"lease {lease} s, heartbeat {HEARTBEAT_SECONDS} s, janitor every {every} s"

    def fig(scenario: str, key: str) -> Figure:
        return Figure.of([r[key] for r in data[scenario]], "s")

    requeued = fig("kill", "requeued_s")
    results.add(Row(
        "kill -9 of a worker mid-build → its build requeued", requeued,
        f"≤ lease + requeue interval ({lease + every} s here)",
        requeued.max <= lease + every,
        note=f"{settings}; with the defaults the bound is {DEFAULT_LEASE_SECONDS} + "
             f"{DEFAULT_REQUEUE_INTERVAL} s"))
    results.add(Row(
        "kill -9 of a worker mid-build → its build succeeded on another worker",
        fig("kill", "completed_s"), "reported", None,
        note="a warm worker started at the kill; second attempt, the first recorded lost"))
    if data["preemption"]:
        preemption_rows(results, data)
    metadata_rows(results, data)


def preemption_rows(results: Results, data: dict[str, Any]) -> None:
    """Add the rows of the SIGUSR1 notices."""

    def fig(key: str) -> Figure:
        return Figure.of([r[key] for r in data["preemption"]], "s")

    results.add(Row(
        "preemption notice (SIGUSR1) mid-build → the build back in the queue",
        fig("handed_back_s"), "reported", None,
        note="no attempt spent (recorded preempted); the sandbox stopped"))
    exited = fig("exited_s")
    results.add(Row(
        "preemption notice (SIGUSR1) mid-build → the worker drained, marked gone, exited 0",
        exited, "≤ 30 s (GCE's notice)", exited.max <= 30,
        note=f"then a warm worker finished the build: {fig('completed_s').text()} after the "
             "notice"))


def metadata_rows(results: Results, data: dict[str, Any]) -> None:
    """Add the rows of the metadata notices, then the PostgreSQL restarts."""

    def fig(scenario: str, key: str) -> Figure:
        return Figure.of([r[key] for r in data[scenario]], "s")

    providers = ", ".join(dict.fromkeys(r["provider"] for r in data["metadata"]))
    exited = fig("metadata", "exited_s")
    results.add(Row(
        f"preemption notice in the cloud's metadata ({providers}; polled every "
        f"{METADATA_POLL_SECONDS:g} s) → the worker drained and exited 0", exited,
        "≤ 30 s (GCE's notice)", exited.max <= 30,
        note=f"the build back in the queue {fig('metadata', 'handed_back_s').text()} after "
             "the notice appeared; a fake metadata server speaking each provider's protocol "
             "(tests/metadata.py)"))
    restart_rows(results, data)


def restart_rows(results: Results, data: dict[str, Any]) -> None:
    """Add the rows of the PostgreSQL restarts."""

    def fig(scenario: str, key: str) -> Figure:
        return Figure.of([r[key] for r in data[scenario]], "s")

    names = {"healthz": "GET /healthz", "status": "GET /api/builds/{key}",
             "post": "POST /api/builds"}
    during = {name: [r["during"][name] for r in data["restart"]] for name in names}
    all_503 = all(d["status"] == 503 and d["retry_after"] for runs in during.values()
                  for d in runs)
    slowest = Figure.of([max(r["during"][name]["seconds"] for name in names)
                         for r in data["restart"]], "s")
    results.add(Row(
        "PostgreSQL stopped → the API answers 503 with Retry-After (the slowest of three "
        "requests)", slowest, "503, never a hang", all_503,
        note="; ".join(f"{title} {Figure.of([d['seconds'] for d in during[name]], 's').text()}"
                       f" ({', '.join(str(d['status']) for d in during[name])})"
                       for name, title in names.items())))
    results.add(Row(
        f"PostgreSQL restarted after {data['outage_seconds']:g} s down → /healthz 200 again",
        fig("restart", "healthy_s"), "reported", None,
        note="the API's pool reconnects by itself; no process restarted"))
    results.add(Row(
        "PostgreSQL restarted → a build posted then is claimed by the idle worker",
        fig("restart", "claimed_s"), "reported", None,
        note=f"the worker polls every 600 s: its re-LISTEN woke it; the POST accepted "
             f"{fig('restart', 'posted_s').text()} after the restart"))
