"""The janitor on a real PostgreSQL and a real artifact directory.

Concurrent janitors (processes and threads) never act twice; storage GC by retention, by
size budget, and its repair of store/database disagreements; pruning.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.artifacts.local import LocalStore
from kiln.artifacts.store import file_sha256
from kiln.db.builds import QueueManager
from kiln.db.maintenance import Maintenance
from kiln.db.notify import QUEUE_CHANNEL
from kiln.db.sql import queries as queue_queries
from kiln.janitor.gc import StorageCollector
from kiln.janitor.prune import Pruner
from kiln.janitor.scheduler import Janitor, Job

REPO = Path(__file__).resolve().parents[2]
SPEC = {"os": "linux", "arch": "amd64"}
DAY = 86400.0


def key_of(n: int) -> str:
    return hashlib.sha256(f"janitor-{n}".encode()).hexdigest()


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(db_url, min_size=1, max_size=12, kwargs={"autocommit": True},
                          open=True)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def queue(pool: ConnectionPool) -> QueueManager:
    return QueueManager(pool)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def sql(pool: ConnectionPool, query: str, params: dict[str, Any] | None = None) -> list[Any]:
    with pool.connection() as conn:
        cur = conn.execute(query, params or {})
        return cur.fetchall() if cur.description else []


def expire_leases(queue: QueueManager, count: int) -> list[str]:
    """Queue ``count`` builds and claim them with leases that have already run out."""
    keys = [key_of(n) for n in range(count)]
    for key in keys:
        queue.enqueue(key, SPEC)
    claimed = queue.claim("killed-worker", limit=count, lease_seconds=0.01)
    assert len(claimed) == count
    time.sleep(0.05)
    return keys


def listen(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
    return conn


def drain_notifications(conn: psycopg.Connection) -> Counter[str]:
    got: Counter[str] = Counter()
    for note in conn.notifies(timeout=1.0):
        got[note.payload] += 1
    return got


def assert_requeued_once(pool: ConnectionPool, keys: list[str]) -> None:
    rows = sql(pool, """SELECT b.key, b.state, b.attempts,
                               count(*) FILTER (WHERE a.outcome = 'lost'),
                               count(*) FILTER (WHERE a.outcome = 'running')
                          FROM kiln_builds b JOIN kiln_attempts a ON a.build_key = b.key
                         GROUP BY b.key""")
    assert sorted(r[0] for r in rows) == sorted(keys)
    for key, state, attempts, lost, running in rows:
        assert (state, attempts, lost, running) == ("queued", 1, 1, 0), key


def janitor_env(db_url: str, store_dir: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "CONFIG_PATH": "/dev/null",
        "KILN_DATABASE__URL": db_url,
        "KILN_STORAGE__LOCAL__PATH": str(store_dir),
        "KILN_LOGGING__LEVEL": "DEBUG",
    }


def test_two_janitor_processes_requeue_each_expired_lease_once(
        db_url: str, queue: QueueManager, pool: ConnectionPool, tmp_path: Path) -> None:
    keys = expire_leases(queue, 25)
    listener = listen(db_url)
    env = janitor_env(db_url, tmp_path / "artifacts")
    procs = [subprocess.Popen([sys.executable, "-m", "functions.janitor", "--once"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert_requeued_once(pool, keys)
    # each requeue woke the workers exactly once
    assert drain_notifications(listener) == Counter({k: 1 for k in keys})
    listener.close()
    # every job ran once between the two of them: the other found it busy or not due
    runs = {r[0]: r[1] for r in sql(pool, "SELECT job, ok FROM kiln_janitor_runs")}
    for name in ("requeue_expired", "mark_gone_workers", "expire_resolutions", "storage_gc",
                 "prune"):
        assert runs[name] is True, name
    done = [line for out in outputs for line in out.splitlines()
            if "janitor job requeue_expired (" in line]
    assert len(done) == 1 and "25: " in done[0], outputs


def test_janitor_marks_silent_workers_gone_and_expires_resolutions(
        db_url: str, queue: QueueManager, pool: ConnectionPool, tmp_path: Path) -> None:
    for worker in ("silent", "alive"):
        queue.register_worker(worker, hostname="h", pid=1, concurrency=1, sandbox="process",
                              go_version="go1.25.0")
    sql(pool, "UPDATE kiln_workers SET heartbeat_at = now() - interval '10 minutes' "
              "WHERE id = 'silent'")
    queue.put_resolution("example.com/m", "latest", "v1.0.0", stored_at=time.time() - 600,
                         ttl=300)
    queue.put_resolution("example.com/m", "v1.0.0", "v1.0.0", stored_at=time.time() - 600,
                         ttl=None)
    run = subprocess.run([sys.executable, "-m", "functions.janitor", "--once"], cwd=REPO,
                         env=janitor_env(db_url, tmp_path / "artifacts"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sql(pool, "SELECT id, state FROM kiln_workers ORDER BY id") == [
        ("alive", "active"), ("silent", "gone")]
    assert sql(pool, "SELECT query FROM kiln_resolutions") == [("v1.0.0",)]


OLD = "docker:kiln-sandbox@sha256:old"
NEW = "docker:kiln-sandbox@sha256:new"
PROCESS = "process:go1.27.3"


def toolchain_build(queue: QueueManager, pool: ConnectionPool, n: int, sandbox: str | None,
                    *, waited: str) -> str:
    """Queue a build keyed with ``sandbox`` and go1.27.3 that has waited ``waited``."""
    spec = dict(SPEC, **({"sandbox": sandbox, "go_version": "go1.27.3"} if sandbox else {}))
    queue.enqueue(key_of(n), spec)
    sql(pool, "UPDATE kiln_builds SET queued_at = now() - %(w)s::interval WHERE key = %(k)s",
        {"w": waited, "k": key_of(n)})
    return key_of(n)


def worker_seen(queue: QueueManager, pool: ConnectionPool, worker_id: str, sandbox: str, *,
                started: str, seen: str | None) -> None:
    """Record a worker started ``started`` ago; ``seen`` None: alive, else gone since then."""
    queue.register_worker(worker_id, hostname="h", pid=1, concurrency=2, sandbox=sandbox,
                          go_version="go1.27.3")
    sql(pool, "UPDATE kiln_workers SET started_at = now() - %(s)s::interval WHERE id = %(id)s",
        {"s": started, "id": worker_id})
    if seen is not None:
        sql(pool, """UPDATE kiln_workers SET state = 'gone',
                            heartbeat_at = now() - %(seen)s::interval,
                            stopped_at = now() - %(seen)s::interval
                      WHERE id = %(id)s""", {"seen": seen, "id": worker_id})


def test_janitor_fails_builds_no_worker_can_claim_and_spares_the_others(
        db_url: str, queue: QueueManager, pool: ConnectionPool, tmp_path: Path) -> None:
    # an image rollout replaced the fleet's sandbox: builds keyed with the old one would
    # wait for ever; those of toolchains the fleet offers must not be touched
    worker_seen(queue, pool, "w-new", NEW, started="1 minute", seen=None)
    worker_seen(queue, pool, "w-old", OLD, started="3 hours", seen="2 hours")
    worker_seen(queue, pool, "w-process", PROCESS, started="5 hours", seen="10 minutes")
    stranded = toolchain_build(queue, pool, 1, OLD, waited="1 hour")
    fresh = toolchain_build(queue, pool, 2, OLD, waited="5 minutes")
    served = toolchain_build(queue, pool, 3, NEW, waited="1 hour")
    recent = toolchain_build(queue, pool, 4, PROCESS, waited="1 hour")
    events = psycopg.connect(db_url, autocommit=True)
    events.execute("LISTEN kiln_events")

    run = subprocess.run([sys.executable, "-m", "functions.janitor", "--once", "--job",
                          "fail_unclaimable"], cwd=REPO,
                         env=janitor_env(db_url, tmp_path / "artifacts"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr

    build = queue.get(stranded)
    assert build is not None and build.state == "failed" and build.finished_at is not None
    assert build.error == (
        f"no build worker has offered the toolchain this build is keyed with (sandbox {OLD} "
        f"with go1.27.3) within the last 30 min; the workers offer sandbox {NEW} with "
        f"go1.27.3; sandbox {PROCESS} with go1.27.3. Ask for the build again: it is then "
        "keyed with their toolchain")
    # retryable: asking for it again queues it rather than answering the old failure
    assert build.error_kind == "retryable"
    for key in (fresh, served, recent):
        left = queue.get(key)
        assert left is not None and (left.state, left.error) == ("queued", None), key
    # waiting clients are told at once
    notes = [n.payload for n in events.notifies(timeout=1.0)]
    events.close()
    assert f'{{"key" : "{stranded}", "state" : "failed"}}' in notes


def test_a_fleet_scaled_to_zero_keeps_the_builds_of_its_toolchain(
        queue: QueueManager, pool: ConnectionPool) -> None:
    # no worker runs now; new builds are keyed with the newest worker's toolchain and a
    # new worker of it is on its way (an autoscaler): those builds wait
    worker_seen(queue, pool, "w-older", OLD, started="6 hours", seen="4 hours")
    worker_seen(queue, pool, "w-newest", NEW, started="5 hours", seen="3 hours")
    kept = toolchain_build(queue, pool, 1, NEW, waited="1 hour")
    stranded = toolchain_build(queue, pool, 2, OLD, waited="1 hour")
    unkeyed = toolchain_build(queue, pool, 3, None, waited="1 hour")

    assert sorted(queue.fail_unclaimable(seconds=1800)) == sorted([stranded, unkeyed])
    assert queue.get(kept).state == "queued"  # type: ignore[union-attr]
    build = queue.get(unkeyed)
    assert build is not None and build.state == "failed"
    assert build.error is not None and build.error.startswith(
        "no build worker has offered the toolchain this build is keyed with (sandbox "
        "(none recorded) with (none recorded)) within the last 30 min; the workers offer "
        f"sandbox {NEW} with go1.27.3.")
    assert queue.fail_unclaimable(seconds=1800) == []  # nothing twice


def test_retries_wait_out_their_backoff_and_end_with_the_last_error(
        queue: QueueManager) -> None:
    key = key_of(1)
    queue.enqueue(key, SPEC, max_attempts=2)
    queue.claim("w", limit=1, lease_seconds=30)
    assert queue.fail(key, "w", error="module proxy unreachable", retryable=True,
                      retry_after=1.0) == "queued"
    assert queue.claim("w", limit=1, lease_seconds=30) == []  # still backing off
    time.sleep(1.1)
    assert [c.key for c in queue.claim("w", limit=1, lease_seconds=30)] == [key]
    assert queue.fail(key, "w", error="StorageError: disk full", retryable=True,
                      retry_after=1.0) == "failed"
    build = queue.get(key)
    assert build is not None and build.error == "StorageError: disk full"


def test_backoff_doubles_with_jitter() -> None:
    from kiln.worker.loop import backoff

    assert [backoff(n, 10.0, rand=lambda: 0.5) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff(3, 10.0, rand=lambda: 0.0) == 20.0  # -50%
    assert backoff(3, 10.0, rand=lambda: 0.999) < 60.0  # under +50%


def test_concurrent_sweeps_requeue_each_lease_once(db_url: str, queue: QueueManager,
                                                   pool: ConnectionPool) -> None:
    # no janitor locks here: the query alone must be safe to run concurrently
    keys = expire_leases(queue, 40)
    listener = listen(db_url)
    barrier = threading.Barrier(8)
    moved: list[str] = []
    lock = threading.Lock()

    def sweep() -> None:
        barrier.wait()
        for _ in range(3):
            rows = queue.requeue_expired()
            with lock:
                moved.extend(r["key"] for r in rows)

    threads = [threading.Thread(target=sweep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(moved) == sorted(keys)
    assert_requeued_once(pool, keys)
    assert drain_notifications(listener) == Counter({k: 1 for k in keys})
    listener.close()


def test_a_job_runs_once_per_turn_between_janitors(queue: QueueManager,
                                                   pool: ConnectionPool) -> None:
    calls: Counter[str] = Counter()
    gate = threading.Event()

    def slow() -> str:
        calls["slow"] += 1
        gate.wait(5)
        return "ran"

    def janitor() -> Janitor:
        return Janitor(queue=queue, migrate=list, jobs=[Job("slow", 60.0, slow)],
                       maintenance=Maintenance(pool))

    first, second = janitor(), janitor()
    outcome: dict[str, str] = {}
    thread = threading.Thread(target=lambda: outcome.update(first.run_once()))
    thread.start()
    deadline = time.monotonic() + 5
    while not calls["slow"] and time.monotonic() < deadline:
        time.sleep(0.01)
    # while the first runs it, the second skips it; forcing does not bypass the lock
    assert second.run_once() == {"slow": "busy"}
    assert second.run_once(only=["slow"]) == {"slow": "busy"}
    gate.set()
    thread.join()
    assert outcome == {"slow": "done"}
    # its turn stays taken for most of an interval, unless an operator forces it
    assert second.run_once() == {"slow": "not due"}
    assert second.run_once(only=["slow"]) == {"slow": "done"}
    assert calls["slow"] == 2
    assert sql(pool, "SELECT ok, result FROM kiln_janitor_runs WHERE job = 'slow'") == [
        (True, "ran")]


def test_a_failing_job_is_recorded_and_the_others_still_run(queue: QueueManager,
                                                            pool: ConnectionPool) -> None:
    def broken() -> None:
        raise RuntimeError("store unreachable")

    janitor = Janitor(queue=queue, migrate=list, maintenance=Maintenance(pool),
                      jobs=[Job("broken", 10.0, broken), Job("fine", 10.0, lambda: None)])
    assert janitor.run_once() == {"broken": "failed", "fine": "done"}
    assert sql(pool, "SELECT job, ok, result FROM kiln_janitor_runs ORDER BY job") == [
        ("broken", False, "RuntimeError: store unreachable"), ("fine", True, "")]


# storage GC ---------------------------------------------------------------------------


def build(queue: QueueManager, store: LocalStore, tmp_path: Path, n: int,
          size: int = 10_000) -> str:
    """Run build ``n`` through the queue and store a ``size``-byte artifact for it."""
    key = key_of(n)
    queue.enqueue(key, SPEC)
    assert [c.key for c in queue.claim("w", limit=1, lease_seconds=60)] == [key]
    binary = tmp_path / f"bin-{n}"
    binary.write_bytes(hashlib.sha256(key.encode()).digest() * (size // 32))
    digest = file_sha256(binary)
    stored = store.put(key, "caddy", binary, sha256=digest)
    assert queue.complete(key, "w", artifact_path=stored.path, artifact_size=stored.size,
                          artifact_sha256=digest)
    return key


def age(pool: ConnectionPool, key: str, *, built_days: float,
        downloaded_days: float | None = None) -> None:
    """Pretend the build finished, and was last downloaded, that many days ago."""
    sql(pool, """UPDATE kiln_builds
                    SET finished_at = now() - make_interval(secs => %(b)s),
                        last_downloaded_at = now() - make_interval(secs => %(d)s::float8)
                  WHERE key = %(key)s""",
        {"key": key, "b": built_days * DAY,
         "d": None if downloaded_days is None else downloaded_days * DAY})


def collector(pool: ConnectionPool, store: LocalStore, **kwargs: Any) -> StorageCollector:
    return StorageCollector(maintenance=Maintenance(pool), store=store,
                            **{"retention": 0.0, "budget_bytes": 0, **kwargs})


def has_artifact(queue: QueueManager, store: LocalStore, key: str) -> bool:
    row = queue.get(key)
    assert row is not None and row.state == "succeeded"
    files = [o for o in store.objects() if key in o.path]
    assert bool(files) == bool(row.artifact_path), (files, row.artifact_path)
    return bool(files)


def test_gc_by_retention_keeps_the_build_and_a_request_rebuilds_it(
        queue: QueueManager, store: LocalStore, pool: ConnectionPool, tmp_path: Path) -> None:
    stale, downloaded, fresh = (build(queue, store, tmp_path, n) for n in range(3))
    age(pool, stale, built_days=40)
    age(pool, downloaded, built_days=40, downloaded_days=2)
    report = collector(pool, store, retention=30 * DAY).collect()
    assert report.expired == [stale] and report.freed_bytes > 0
    assert not has_artifact(queue, store, stale)
    assert has_artifact(queue, store, downloaded) and has_artifact(queue, store, fresh)
    # the row stays; asking for it again queues a rebuild
    again = queue.enqueue(stale, SPEC)
    assert again.queued and again.build.state == "queued"
    assert not queue.enqueue(fresh, SPEC).queued
    # a second pass has nothing left to do
    assert not collector(pool, store, retention=30 * DAY).collect()


def test_gc_over_budget_deletes_least_recently_downloaded_first(
        queue: QueueManager, store: LocalStore, pool: ConnectionPool, tmp_path: Path) -> None:
    keys = [build(queue, store, tmp_path, n, size=100_000) for n in range(4)]
    # last use: key 2 longest ago (never downloaded, built 9 days ago), then 0, 3, 1
    age(pool, keys[0], built_days=10, downloaded_days=5)
    age(pool, keys[1], built_days=10, downloaded_days=1)
    age(pool, keys[2], built_days=9)
    age(pool, keys[3], built_days=10, downloaded_days=3)
    report = collector(pool, store, budget_bytes=250_000).collect()
    assert report.over_budget == [keys[2], keys[0]]
    assert report.stored_bytes <= 250_000
    assert [has_artifact(queue, store, k) for k in keys] == [False, True, False, True]


def test_gc_never_collects_an_artifact_within_its_grace(
        queue: QueueManager, store: LocalStore, pool: ConnectionPool, tmp_path: Path) -> None:
    old, new = build(queue, store, tmp_path, 0), build(queue, store, tmp_path, 1)
    age(pool, old, built_days=1)
    report = collector(pool, store, budget_bytes=1, grace_seconds=3600).collect()
    assert report.over_budget == [old]
    assert has_artifact(queue, store, new)


def test_gc_repairs_orphans_and_missing_artifacts(
        queue: QueueManager, store: LocalStore, pool: ConnectionPool, tmp_path: Path) -> None:
    kept = build(queue, store, tmp_path, 0)
    vanished = build(queue, store, tmp_path, 1)
    age(pool, vanished, built_days=1)
    row = queue.get(vanished)
    assert row is not None
    (store.root / row.artifact_path).unlink()  # an operator or lifecycle rule removed it
    # an upload whose build then failed for good (e.g. its lease was taken away)
    failed = key_of(2)
    queue.enqueue(failed, SPEC)
    queue.claim("w", limit=1, lease_seconds=60)
    binary = tmp_path / "orphan"
    binary.write_bytes(b"x" * 1000)
    store.put(failed, "caddy", binary, sha256=file_sha256(binary))
    queue.fail(failed, "w", error="compile error", retryable=False)
    # an upload of a build that is still running must not be touched
    running = key_of(3)
    queue.enqueue(running, SPEC)
    queue.claim("w", limit=1, lease_seconds=60)
    store.put(running, "caddy", binary, sha256=file_sha256(binary))

    report = collector(pool, store).collect()
    assert report.orphans == [failed]
    assert report.missing == [vanished]
    assert has_artifact(queue, store, kept)
    assert not has_artifact(queue, store, vanished)
    assert queue.enqueue(vanished, SPEC).queued  # the next request rebuilds it
    assert [o.path for o in store.objects() if failed in o.path] == []
    assert [o.path for o in store.objects() if running in o.path] != []


def test_a_rebuild_never_races_the_delete_of_a_collected_artifact(
        queue: QueueManager, store: LocalStore, pool: ConnectionPool, db_url: str,
        tmp_path: Path) -> None:
    key = build(queue, store, tmp_path, 0)
    age(pool, key, built_days=40)
    maintenance = Maintenance(pool)
    requeued: list[Any] = []

    def requeue() -> None:  # the statement every request that queues a build runs
        with psycopg.connect(db_url, autocommit=True) as conn:
            requeued.extend(conn.execute(queue_queries()["enqueue"], {
                "key": key, "spec": Jsonb(SPEC), "priority": 0, "max_attempts": 3,
                "requested_by": None}).fetchall())

    with maintenance.locked_artifact(key, older_than=30 * DAY) as ok:
        assert ok
        thread = threading.Thread(target=requeue)
        thread.start()
        time.sleep(0.3)
        # it waits for the collection: no worker can upload while the objects are deleted
        assert thread.is_alive() and requeued == []
        store.delete(key)
    thread.join(10)
    assert requeued == [(key,)]  # then it queues the rebuild
    assert queue.get(key).state == "queued"
    assert [o for o in store.objects() if key in o.path] == []


# pruning ------------------------------------------------------------------------------


def test_prune_removes_old_logs_attempts_and_gone_workers(
        queue: QueueManager, pool: ConnectionPool) -> None:
    old, recent = key_of(0), key_of(1)
    for key in (old, recent):
        queue.enqueue(key, SPEC)
        queue.claim("w", limit=1, lease_seconds=60)
        queue.fail(key, "w", error="boom", retryable=False)
    sql(pool, "UPDATE kiln_attempts SET finished_at = now() - interval '100 days' "
              "WHERE build_key = %(k)s", {"k": old})
    for key, days in ((old, 20), (recent, 1)):
        sql(pool, """INSERT INTO kiln_build_logs (build_key, attempt, seq, step, line, at)
                     VALUES (%(k)s, 1, 1, 'fetch', 'go: downloading',
                             now() - make_interval(days => %(d)s))""", {"k": key, "d": days})
    for n, days in enumerate((200, 150, 100)):
        queue.register_worker(f"w{n}", hostname="h", pid=n, concurrency=1, sandbox="process",
                              go_version="go1.25.0")
        sql(pool, """UPDATE kiln_workers SET state = 'gone',
                            started_at = now() - make_interval(days => %(d)s),
                            stopped_at = now() - make_interval(days => %(d)s)
                      WHERE id = %(id)s""", {"id": f"w{n}", "d": days})
    report = Pruner(maintenance=Maintenance(pool), log_retention=14 * DAY,
                    attempt_retention=90 * DAY).prune()
    assert (report.log_lines, report.attempts, report.workers) == (1, 1, 2)
    assert [a["outcome"] for a in queue.attempts(old)] == []
    assert [a["outcome"] for a in queue.attempts(recent)] == ["failed"]
    assert sql(pool, "SELECT build_key FROM kiln_build_logs") == [(recent,)]
    # the newest worker stays, even gone: new build keys take its toolchain
    assert sql(pool, "SELECT id FROM kiln_workers") == [("w2",)]
