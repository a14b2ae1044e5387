"""Build logs on a real PostgreSQL: batched writes with NOTIFY, and exact event-stream resume."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.api.events import BuildWatch, Cursor
from kiln.db.build_logs import LOGS_CHANNEL, BuildLogs
from kiln.db.builds import QueueManager
from kiln.request.spec import BuildSpec
from kiln.worker.buildlog import LogWriter

SPEC = BuildSpec(os="linux", arch="amd64", arm="", caddy_version="v2.8.4", plugins=(),
                 replacements=(), go_version="go1.27.3", sandbox="process")
KEY = SPEC.key()
WORKER = "w1"


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True})
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def queue(pool: ConnectionPool) -> QueueManager:
    queue = QueueManager(pool)
    queue.enqueue(KEY, SPEC.to_dict())
    return queue


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def stored(logs: BuildLogs) -> list[tuple[int, int, str, str]]:
    return [(x.attempt, x.seq, x.step, x.line) for x in logs.iter_lines(KEY)]


def test_lines_are_stored_in_batches_each_announced(db_url: str, pool: ConnectionPool,
                                                    queue: QueueManager) -> None:
    logs = BuildLogs(pool)
    writer = LogWriter(logs, batch_lines=3, flush_seconds=3600)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {LOGS_CHANNEL}")
        sink = writer(KEY, 1)
        for n in range(7):
            sink("fetch", f"line {n}")
        # two full batches are written by the writer thread; the 7th line waits
        wait_until(lambda: len(stored(logs)) == 6)
        assert [seq for _, seq, _, _ in stored(logs)] == [1, 2, 3, 4, 5, 6]
        # the attempt's last line writes everything at once, from the caller's thread
        sink("result", "succeeded: 1 bytes")
        assert stored(logs)[-2:] == [(1, 7, "fetch", "line 6"),
                                     (1, 8, "result", "succeeded: 1 bytes")]
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=3)]
    assert notes == [{"key": KEY, "attempt": 1, "seq": seq} for seq in (3, 6, 8)]
    writer.close()


def test_a_quiet_step_is_written_after_flush_seconds(pool: ConnectionPool,
                                                     queue: QueueManager) -> None:
    logs = BuildLogs(pool)
    writer = LogWriter(logs, batch_lines=100, flush_seconds=0.05)
    writer(KEY, 1)("compile", "$ go build")
    wait_until(lambda: stored(logs) == [(1, 1, "compile", "$ go build")])
    writer.close()


class FlakyLogs(BuildLogs):
    """BuildLogs whose first ``failures`` writes fail as if the database were away."""

    def __init__(self, pool: ConnectionPool, failures: int) -> None:
        super().__init__(pool)
        self.failures = failures

    def append(self, key: str, attempt: int, entries: list[tuple[int, str, str, float]]) -> int:
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("the database is away")
        return super().append(key, attempt, entries)


def test_storage_faults_never_reach_the_build(pool: ConnectionPool, queue: QueueManager) -> None:
    logs = FlakyLogs(pool, failures=2)
    writer = LogWriter(logs, batch_lines=2, flush_seconds=0.01)
    sink = writer(KEY, 1)
    for n in range(5):
        sink("fetch", f"line {n}")  # never raises
    sink("result", "failed: x")
    wait_until(lambda: len(stored(logs)) == 6)  # retried, in order, nothing lost
    assert [line for _, _, _, line in stored(logs)] == [
        "line 0", "line 1", "line 2", "line 3", "line 4", "failed: x"]
    # a database that stays away: lines are dropped, the build goes on
    logs.failures = 10**6
    sink2 = writer(KEY, 2)
    for n in range(10):
        sink2("fetch", f"lost {n}")
    sink2("result", "succeeded")
    writer.close()
    assert len(stored(logs)) == 6


def test_long_lines_are_cut_and_long_logs_capped(pool: ConnectionPool,
                                                 queue: QueueManager) -> None:
    logs = BuildLogs(pool)
    writer = LogWriter(logs, max_line_length=100, max_lines=150)
    sink = writer(KEY, 1)
    sink("fetch", "x" * 1000)
    for n in range(300):
        sink("fetch", f"line {n}")
    sink("result", "succeeded")
    lines = [line for _, _, _, line in stored(logs)]
    assert lines[0] == "x" * 100 + " [line cut]"
    assert len(lines) == 152 and "passed 150 lines" in lines[-2]
    assert lines[-1] == "succeeded"
    writer.close()


def run_two_attempts(queue: QueueManager, logs: BuildLogs) -> None:
    """Attempt 1 fails (retryable), attempt 2 succeeds, each with logged lines."""
    (job,) = queue.claim(WORKER, limit=1, lease_seconds=60)
    logs.append(KEY, job.attempt, [(1, "resolve", "caddy v2.8.4", 0.0),
                                   (2, "fetch", "$ go get", 0.0),
                                   (3, "fetch", "dial tcp: refused", 0.0)])
    assert queue.fail(KEY, WORKER, error="proxy unreachable", retryable=True) == "queued"
    logs.append(KEY, job.attempt, [(4, "result", "failed: proxy unreachable", 0.0)])
    (job,) = queue.claim(WORKER, limit=1, lease_seconds=60)
    assert job.attempt == 2
    logs.append(KEY, 2, [(n, step, f"{step} {n}", 0.0) for n, step in enumerate(
        ["resolve", "fetch", "fetch", "compile", "upload"], 1)])
    assert queue.complete(KEY, WORKER, artifact_path="builds/x", artifact_size=1,
                          artifact_sha256="0" * 64)
    logs.append(KEY, 2, [(6, "result", "succeeded: 1 bytes", 0.0)])


def stream(queue: QueueManager, logs: BuildLogs, last_event_id: str = "") -> list[dict[str, Any]]:
    watch = BuildWatch(key=KEY, cursor=Cursor.parse(last_event_id), queue=queue, logs=logs,
                       notifier=None)
    events = []
    for chunk in watch.events():
        for block in chunk.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines()
                          if line and not line.startswith((":", "retry")))
            if fields:
                events.append({"id": fields["id"], "event": fields["event"],
                               "data": json.loads(fields["data"])})
    return events


def test_resuming_from_any_event_gives_exactly_the_rest(pool: ConnectionPool,
                                                        queue: QueueManager) -> None:
    logs = BuildLogs(pool)
    run_two_attempts(queue, logs)
    events = stream(queue, logs)
    kinds = [e["event"] for e in events]
    assert kinds.count("log") == 10 and kinds[-2:] == ["state", "result"]
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == [
        "resolve", "fetch", "resolve", "fetch", "compile", "upload"]
    assert events[-1]["data"]["state"] == "succeeded"
    for n, event in enumerate(events[:-1]):
        rest = stream(queue, logs, event["id"])
        assert [(e["event"], e["data"]) for e in rest] == [
            (e["event"], e["data"]) for e in events[n + 1:]], f"resumed after event {n}"
    # after the result there is nothing left to send
    assert BuildWatch(key=KEY, cursor=Cursor.parse(events[-1]["id"]), queue=queue, logs=logs,
                      notifier=None).finished_already()


def test_malformed_event_ids_replay_from_the_start() -> None:
    for text in ("", "junk", "1.2.3.4.5.6", "-1.2", "1.x", "1.2.FETCH", "1.2.fetch.bad state"):
        assert Cursor.parse(text) == Cursor()
    cursor = Cursor(2, 17, "compile", "running-2")
    assert Cursor.parse(cursor.encode()) == cursor
