"""Enqueueing a build that is already queued, running or built only reads it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.db.builds import QueueManager


def key_of(n: int) -> str:
    return hashlib.sha256(f"reads-{n}".encode()).hexdigest()


SPEC = {"os": "linux", "arch": "amd64"}


@pytest.fixture
def queue(db_url: str) -> Iterator[QueueManager]:
    with ConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
        yield QueueManager(pool)


def _succeed(queue: QueueManager, key: str) -> None:
    queue.enqueue(key, SPEC)
    assert [c.key for c in queue.claim("w", limit=1, lease_seconds=60)] == [key]
    assert queue.complete(key, "w", artifact_path=f"builds/{key}/caddy", artifact_size=1,
                          artifact_sha256="0" * 64)


def test_a_built_key_is_answered_while_its_row_is_locked(queue: QueueManager,
                                                        db_url: str) -> None:
    key = key_of(1)
    _succeed(queue, key)
    answered = threading.Event()
    with psycopg.connect(db_url) as holder:
        # another transaction holds the row (as one that counts a download does)
        holder.execute("SELECT 1 FROM kiln_builds WHERE key = %s FOR UPDATE", (key,))

        def ask() -> None:
            result = queue.enqueue(key, SPEC)
            assert result.build.state == "succeeded" and not result.queued
            answered.set()

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # generous: only a blocked enqueue takes this long
        assert answered.wait(10), "enqueue of a built key waited for the row lock"
        holder.rollback()
    asker.join(5)


@pytest.mark.parametrize("outcome", ["queued", "running", "failed"])
def test_enqueue_leaves_queued_running_and_permanently_failed_builds(
        queue: QueueManager, outcome: str) -> None:
    key = key_of(2)
    queue.enqueue(key, SPEC, priority=1)
    if outcome != "queued":
        queue.claim("w", limit=1, lease_seconds=60)
    if outcome == "failed":
        queue.fail(key, "w", error="compile error", retryable=False)
    before = queue.get(key)
    result = queue.enqueue(key, SPEC, priority=5)
    assert not result.queued
    after = queue.get(key)
    assert after is not None and before is not None
    if outcome == "queued":
        # a queued build joined at a higher priority is lifted to it (a user joining a
        # prebuild must not wait behind every other build); nothing else about it changes
        assert after.priority == 5
        assert replace(after, priority=before.priority, updated_at=before.updated_at) == before
    else:
        assert result.build == before == after
    # a lower priority never lowers it
    queue.enqueue(key, SPEC, priority=0)
    assert queue.get(key).priority == after.priority  # type: ignore[union-attr]


def test_enqueue_still_rebuilds_what_can_change(queue: QueueManager) -> None:
    built, retry = key_of(3), key_of(4)
    _succeed(queue, built)
    assert queue.forget_artifact(built)
    queue.enqueue(retry, SPEC, max_attempts=1)
    queue.claim("w", limit=1, lease_seconds=60)
    queue.fail(retry, "w", error="proxy unreachable", retryable=True)
    for key in (built, retry):
        result = queue.enqueue(key, SPEC)
        assert result.queued and result.build.state == "queued"
