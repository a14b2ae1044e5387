"""The queue on a real PostgreSQL: idempotent enqueue, exclusive claims, leases, NOTIFY."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from kiln.db.builds import QueueManager
from kiln.db.notify import QUEUE_CHANNEL
from kiln.db.sql import queries


def key_of(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


SPEC = {"os": "linux", "arch": "amd64"}


@pytest.fixture
def queue(db_url: str) -> Iterator[QueueManager]:
    pool = ConnectionPool(db_url, min_size=1, max_size=12, kwargs={"autocommit": True})
    try:
        yield QueueManager(pool)
    finally:
        pool.close()


def test_enqueue_is_idempotent(queue: QueueManager) -> None:
    first = queue.enqueue(key_of(1), SPEC)
    second = queue.enqueue(key_of(1), SPEC)
    assert first.queued and not second.queued
    assert second.build.state == "queued"
    with queue.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM kiln_builds").fetchone()[0] == 1


def test_concurrent_claims_never_share_a_build(queue: QueueManager) -> None:
    for n in range(60):
        queue.enqueue(key_of(n), SPEC)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(i: int) -> None:
        while True:
            got = queue.claim(f"w{i}", limit=3, lease_seconds=30)
            if not got:
                return
            with lock:
                claimed.extend(c.key for c in got)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(key_of(n) for n in range(60))
    with queue.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM kiln_attempts").fetchone()[0] == 60


def test_claim_order_is_priority_then_age(queue: QueueManager) -> None:
    queue.enqueue(key_of(1), SPEC)
    queue.enqueue(key_of(2), SPEC, priority=5)
    queue.enqueue(key_of(3), SPEC)
    assert queue.queue_position(key_of(2)) == 0
    assert queue.queue_position(key_of(3)) == 2
    order = [queue.claim("w", limit=1, lease_seconds=30)[0].key for _ in range(3)]
    assert order == [key_of(2), key_of(1), key_of(3)]


def test_expired_lease_is_requeued_and_attempt_recorded_lost(queue: QueueManager) -> None:
    queue.enqueue(key_of(1), SPEC)
    [job] = queue.claim("dead-worker", limit=1, lease_seconds=2)
    assert queue.requeue_expired() == []  # lease still valid
    time.sleep(2.2)
    moved = queue.requeue_expired()
    assert [(m["key"], m["state"]) for m in moved] == [(job.key, "queued")]
    # the dead worker can no longer complete or extend it
    assert not queue.complete(job.key, "dead-worker", artifact_path="x", artifact_size=1,
                              artifact_sha256="0" * 64)
    assert queue.extend_leases("dead-worker", [job.key], lease_seconds=30) == set()
    [again] = queue.claim("live-worker", limit=1, lease_seconds=30)
    assert again.attempt == 2
    outcomes = [a["outcome"] for a in queue.attempts(job.key)]
    assert outcomes == ["lost", "running"]


def test_retryable_failure_requeues_until_max_attempts(queue: QueueManager) -> None:
    queue.enqueue(key_of(1), SPEC, max_attempts=2)
    queue.claim("w", limit=1, lease_seconds=30)
    assert queue.fail(key_of(1), "w", error="proxy down", retryable=True) == "queued"
    queue.claim("w", limit=1, lease_seconds=30)
    assert queue.fail(key_of(1), "w", error="proxy down", retryable=True) == "failed"
    build = queue.get(key_of(1))
    assert build is not None and build.error == "proxy down"


def test_permanent_failure_is_final_at_once(queue: QueueManager) -> None:
    queue.enqueue(key_of(1), SPEC)
    queue.claim("w", limit=1, lease_seconds=30)
    assert queue.fail(key_of(1), "w", error="compile error", retryable=False) == "failed"
    # asking again does not rebuild a build that can only fail the same way
    assert not queue.enqueue(key_of(1), SPEC).queued


def test_release_does_not_spend_an_attempt(queue: QueueManager) -> None:
    queue.enqueue(key_of(1), SPEC)
    queue.claim("w", limit=1, lease_seconds=30)
    assert queue.release(key_of(1), "w")
    build = queue.get(key_of(1))
    assert build is not None and build.state == "queued" and build.attempts == 0
    assert [a["outcome"] for a in queue.attempts(key_of(1))] == ["preempted"]


def test_notify_wakes_a_listener(queue: QueueManager, db_url: str) -> None:
    got: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"LISTEN {QUEUE_CHANNEL}")
            ready.set()
            for note in conn.notifies(timeout=10, stop_after=1):
                got.append(note.payload)

    t = threading.Thread(target=listen)
    t.start()
    ready.wait(5)
    queue.enqueue(key_of(7), SPEC)
    t.join(12)
    assert got == [key_of(7)]


def test_notifier_fans_out_to_subscribers_of_a_key(queue: QueueManager, db_url: str) -> None:
    from kiln.db.notify import EVENTS_CHANNEL, Notifier, parse_event

    notifier = Notifier(lambda: psycopg.connect(db_url, autocommit=True),
                        channels=[EVENTS_CHANNEL])
    try:
        mine = notifier.subscribe(EVENTS_CHANNEL, key_of(1))
        other = notifier.subscribe(EVENTS_CHANNEL, key_of(2))
        assert notifier.connected.wait(10)
        # the first delivery after connecting asks subscribers to re-read
        assert mine.wait(5) is not None and other.wait(5) is not None
        queue.enqueue(key_of(1), SPEC)
        payload = mine.wait(10)
        assert payload is not None and parse_event(payload) == (key_of(1), "queued")
        assert other.wait(0.3) is None
        mine.close()
        other.close()
        assert notifier.subscribers() == 0
    finally:
        notifier.stop()


def toolchain_spec(sandbox: str, go_version: str) -> dict[str, str]:
    return {"os": "linux", "arch": "amd64", "sandbox": sandbox, "go_version": go_version}


def test_a_worker_claims_only_builds_keyed_with_its_sandbox_and_go(queue: QueueManager) -> None:
    # a mixed fleet (an image rollout, an `auto` sandbox that fell back to process): each
    # build waits for a worker that has the sandbox and the Go it was keyed and attested with
    queue.enqueue(key_of(1), toolchain_spec("docker:kiln-sandbox@sha256:new", "go1.27.3"))
    queue.enqueue(key_of(2), toolchain_spec("process:go1.27.3", "go1.27.3"))
    queue.enqueue(key_of(3), toolchain_spec("docker:kiln-sandbox@sha256:new", "go1.26.0"))
    # only builds a worker of its own toolchain would take count as ahead of it
    assert queue.queue_position(key_of(3)) == 0
    assert queue.queue_position(key_of(2)) == 0

    assert queue.claim("w-process", sandbox="process:go1.27.3", go_version="go1.27.3",
                       limit=3, lease_seconds=30)[0].key == key_of(2)
    assert queue.claim("w-process", sandbox="process:go1.27.3", go_version="go1.27.3",
                       limit=3, lease_seconds=30) == []
    assert queue.claim("w-old", sandbox="docker:kiln-sandbox@sha256:old", go_version="go1.27.3",
                       limit=3, lease_seconds=30) == []
    [new] = queue.claim("w-new", sandbox="docker:kiln-sandbox@sha256:new", go_version="go1.27.3",
                        limit=3, lease_seconds=30)
    assert new.key == key_of(1)
    build = queue.get(key_of(3))
    assert build is not None and build.state == "queued" and build.attempts == 0
    # a tool that builds nothing claims builds of any toolchain
    assert [c.key for c in queue.claim("w-tool", limit=3, lease_seconds=30)] == [key_of(3)]


def test_live_workers_counts_only_those_with_the_toolchain_asked_for(
        queue: QueueManager) -> None:
    queue.register_worker("w-process", hostname="h", pid=1, concurrency=1,
                          sandbox="process:go1.27.3", go_version="go1.27.3")
    assert queue.live_workers(seconds=60) == 1
    assert queue.live_workers(seconds=60, sandbox="process:go1.27.3",
                              go_version="go1.27.3") == 1
    assert queue.live_workers(seconds=60, sandbox="docker:kiln-sandbox@sha256:new",
                              go_version="go1.27.3") == 0
    assert queue.live_workers(seconds=60, sandbox="process:go1.27.3",
                              go_version="go1.26.0") == 0


def explain(conn: psycopg.Connection, name: str, params: dict[str, object], *,
            generic: bool) -> str:
    """Return the plan of the named builds.sql query: as first run, or as a prepared one."""
    text = queries()[name]
    if not generic:
        return "\n".join(r[0] for r in conn.execute("EXPLAIN " + text, params))
    # psycopg prepares a statement run often on one connection, and PostgreSQL may then
    # plan it once for any parameters: that plan must use the index as well
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", text)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", text)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    types = ", ".join({str: "text", int: "int", float: "float8"}[type(params[n])]
                      for n in names)
    conn.execute(f"PREPARE probe ({types}) AS {numbered}")
    try:
        values = sql.SQL(", ").join(sql.Literal(params[n]) for n in names).as_string(conn)
        return "\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE probe({values})"))
    finally:
        conn.execute("DEALLOCATE probe")
        conn.execute("RESET plan_cache_mode")


def test_the_claim_of_one_toolchain_uses_its_index(queue: QueueManager, db_url: str) -> None:
    # a rollout: thousands of builds queued for other toolchains must not be walked, nor the
    # whole table scanned, each time a worker claims
    toolchains = [("docker:kiln-sandbox@sha256:old", "go1.26.0"),
                  ("docker:kiln-sandbox@sha256:new", "go1.27.3"),
                  ("process:go1.27.3", "go1.27.3"),
                  ("docker:kiln-sandbox@sha256:new", "go1.26.0")]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n, (sandbox, go_version) in enumerate(toolchains):
            conn.execute(
                """INSERT INTO kiln_builds (key, spec, state, priority)
                   SELECT encode(sha256(convert_to(%(n)s::text || '-' || i, 'UTF8')), 'hex'),
                          jsonb_build_object('os', 'linux', 'arch', 'amd64',
                                             'sandbox', %(sandbox)s::text,
                                             'go_version', %(go)s::text),
                          CASE WHEN i %% 10 = 0 THEN 'succeeded' ELSE 'queued' END, i %% 3
                     FROM generate_series(1, 1500) AS i""",
                {"n": str(n), "sandbox": sandbox, "go": go_version})
        conn.execute("ANALYZE kiln_builds")
        params = {"worker_id": "w", "limit": 2, "lease_seconds": 60.0,
                  "sandbox": "process:go1.27.3", "go_version": "go1.27.3"}
        for generic in (False, True):
            plan = explain(conn, "claim", params, generic=generic)
            assert "kiln_builds_claim_toolchain_idx" in plan, plan
            assert "Seq Scan on kiln_builds" not in plan, plan
    # and it claims what the index gives: that toolchain's builds, highest priority first
    claimed = queue.claim("w", limit=2, lease_seconds=60, sandbox="process:go1.27.3",
                          go_version="go1.27.3")
    assert [c.spec["sandbox"] for c in claimed] == ["process:go1.27.3"] * 2
    assert {queue.get(c.key).priority for c in claimed} == {2}  # type: ignore[union-attr]
