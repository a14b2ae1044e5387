"""Quotas on a real PostgreSQL: counted once per new build, atomically, across processes."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg_pool import ConnectionPool

from kiln.api.principal import Principal
from kiln.api.quota import QuotaExceeded, QuotaManager
from kiln.db.api_keys import KeyManager
from kiln.db.builds import QueueManager
from kiln.db.notify import QUEUE_CHANNEL
from tests.service import KilnProcesses

SPEC = {"os": "linux", "arch": "amd64"}
ANON = Principal(address="203.0.113.7")


def key_of(n: int) -> str:
    return hashlib.sha256(f"quota-{n}".encode()).hexdigest()


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(db_url, min_size=1, max_size=24, kwargs={"autocommit": True}) as p:
        yield p


def enqueue(queue: QueueManager, quota: QuotaManager, principal: Principal, n: int) -> bool:
    """Queue build n for principal as BuildService does; tell whether it was queued anew."""
    return queue.enqueue(key_of(n), SPEC, requested_by=principal.requester,
                         admit=quota.admitter(principal)).queued


def test_builds_over_the_limit_are_refused_and_never_queued(pool: ConnectionPool,
                                                             db_url: str) -> None:
    queue = QueueManager(pool)
    quota = QuotaManager(pool, window_seconds=600, anonymous_builds=3)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {QUEUE_CHANNEL}")
        assert [enqueue(queue, quota, ANON, n) for n in range(3)] == [True, True, True]
        with pytest.raises(QuotaExceeded) as refused:
            enqueue(queue, quota, ANON, 3)
        assert 1 <= refused.value.retry_after <= 600
        assert "3 new build(s) allowed per 600 s" in refused.value.message
        # asking again for a build that exists is served, and costs nothing
        assert enqueue(queue, quota, ANON, 1) is False
        assert quota.usage(ANON) == 3
        woken = [n.payload for n in listener.notifies(timeout=0.5)]
    assert queue.get(key_of(3)) is None
    assert sorted(woken) == sorted(key_of(n) for n in range(3))


def test_concurrent_requests_never_exceed_the_limit(pool: ConnectionPool) -> None:
    queue = QueueManager(pool)
    quota = QuotaManager(pool, window_seconds=600, anonymous_builds=5)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def ask(n: int) -> None:
        start.wait()
        try:
            queued = enqueue(queue, quota, ANON, 100 + n)
        except QuotaExceeded:
            queued = False
        with lock:
            results.append(queued)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM kiln_builds").fetchone()[0] == 5  # type: ignore[index]


def test_subjects_keys_and_ipv6_networks(pool: ConnectionPool) -> None:
    queue = QueueManager(pool)
    quota = QuotaManager(pool, window_seconds=600, anonymous_builds=1, key_builds=2)
    keys = KeyManager(pool)
    builder, _ = keys.create("ci")
    generous, _ = keys.create("generous", builds_per_window=4)
    admin, _ = keys.create("ops", scope="admin")

    # one host holds a /64: its addresses share one counter
    assert enqueue(queue, quota, Principal("2001:db8:1:2::10"), 0)
    with pytest.raises(QuotaExceeded):
        enqueue(queue, quota, Principal("2001:db8:1:2::99"), 1)
    assert enqueue(queue, quota, Principal("2001:db8:1:3::10"), 2)
    # a key has its own counter, whatever address it comes from
    assert enqueue(queue, quota, Principal("2001:db8:1:2::10", builder), 3)
    assert enqueue(queue, quota, Principal("198.51.100.1", builder), 4)
    with pytest.raises(QuotaExceeded):
        enqueue(queue, quota, Principal("198.51.100.2", builder), 5)
    # a key's own limit wins over the default; admin keys are not limited
    assert all(enqueue(queue, quota, Principal("198.51.100.1", generous), 10 + n)
               for n in range(4))
    with pytest.raises(QuotaExceeded):
        enqueue(queue, quota, Principal("198.51.100.1", generous), 14)
    assert all(enqueue(queue, quota, Principal("198.51.100.1", admin), 20 + n)
               for n in range(5))


def test_the_next_window_starts_afresh(pool: ConnectionPool) -> None:
    queue = QueueManager(pool)
    quota = QuotaManager(pool, window_seconds=1, anonymous_builds=1)
    deadline = time.monotonic() + 10
    n = 0
    while time.monotonic() < deadline:  # until two builds land in two windows
        try:
            enqueue(queue, quota, ANON, 200 + n)
        except QuotaExceeded as exc:
            assert exc.retry_after == 1
            time.sleep(0.2)
        n += 1
        with pool.connection() as conn:
            if conn.execute("SELECT count(*) FROM kiln_builds").fetchone()[0] >= 2:  # type: ignore[index]
                break
    else:
        pytest.fail("no second build was admitted in the next window")
    # counters of ended windows are removed as new windows open
    with pool.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM kiln_quota_usage").fetchone()[0]  # type: ignore[index]
    assert rows <= 2


def test_requests_limit_counts_cached_requests_too(pool: ConnectionPool) -> None:
    quota = QuotaManager(pool, window_seconds=600, requests=2)
    quota.check_request(ANON)
    quota.check_request(ANON)
    with pytest.raises(QuotaExceeded) as refused:
        quota.check_request(ANON)
    assert refused.value.limit == "requests"


# -- two API processes, one database ------------------------------------------------------


@pytest.mark.slow
def test_limit_holds_across_two_api_processes(db_url: str, proxy_dir: Path, go_cache_dir: Path,
                                              tmp_path: Path) -> None:
    with ConnectionPool(db_url, min_size=1, max_size=2, kwargs={"autocommit": True}) as p:
        # a registered worker gives the toolchain that build keys are made with; nothing
        # claims, so every build stays queued
        QueueManager(p).register_worker("quota-test", hostname="test", pid=1, concurrency=1,
                                        sandbox="process:go1.27.3", go_version="go1.27.3")
    env = {"KILN_QUOTA__ANONYMOUS_BUILDS": "3", "KILN_QUOTA__WINDOW_SECONDS": "3600"}
    apis = [KilnProcesses(db_url=db_url, root=tmp_path / name, goproxy=f"file://{proxy_dir}",
                          cache_dir=go_cache_dir, env=env) for name in ("a", "b")]
    try:
        for api in apis:
            api.start_api()
        archs = ["amd64", "arm64", "386", "riscv64", "s390x"]

        def post(i: int, arch: str) -> requests.Response:
            return apis[i % 2].post_build({"os": "linux", "arch": arch,
                                           "caddy_version": "v2.8.0"})

        accepted = [post(i, arch) for i, arch in enumerate(archs[:3])]
        assert [r.status_code for r in accepted] == [202, 202, 202], accepted[0].text
        refused = post(3, archs[3])
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3600
        body = refused.json()
        assert body["status_code"] == 429 and "3 new build(s)" in body["error"]["message"]
        assert body["error"]["id"] == refused.headers["X-Request-Id"]
        # the other process refuses too; a build already queued is still answered
        assert post(4, archs[4]).status_code == 429
        again = post(1, archs[0])
        assert again.status_code == 202 and again.json()["key"] == accepted[0].json()["key"]
        with psycopg.connect(db_url) as conn:
            count = conn.execute("SELECT count(*) FROM kiln_builds").fetchone()[0]  # type: ignore[index]
        assert count == 3
    finally:
        for api in apis:
            api.close()
