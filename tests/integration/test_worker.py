"""The worker's claim loop, in-process, against a real PostgreSQL, store and build logs.

Only the compiler is replaced: a scripted builder that holds a build until the test lets it
go, succeeds by writing a small file, fails, or raises. Real builds run in the e2e tests;
these are about what the loop does around a build: claiming, leases, cancellation, handing a
build back, and when the worker stops. Each assertion is on something a user or an operator
sees: the build's state and error, its attempts, its log, the stored artifact, the worker row.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kiln.artifacts.local import LocalStore
from kiln.artifacts.store import file_sha256
from kiln.db.build_logs import RESULT_STEP, BuildLogs
from kiln.db.builds import Build, QueueManager
from kiln.db.sql import queries
from kiln.request.spec import BuildSpec
from kiln.worker.builder import BuildFailure, BuildOutput, Cancelled, LogSink
from kiln.worker.buildlog import LogWriter
from kiln.worker.loop import Worker
from kiln.worker.sandbox.process import ProcessSandbox, find_go
from tests.service import wait_for

#: longest any test waits for one thing to happen (each happens well within a second)
WAIT_SECONDS = 5.0
#: a lease no test lets run out by itself
LEASE_SECONDS = 30.0
#: a heartbeat that never comes within a test: the path under test must act without it
NO_HEARTBEAT_SECONDS = 60.0
FAST = {"heartbeat_seconds": 0.2, "poll_seconds": 0.2, "retry_base_seconds": 0.02,
        "lease_seconds": LEASE_SECONDS}

BASE_SPEC = BuildSpec(os="linux", arch="amd64", arm="", caddy_version="v2.8.4", plugins=(),
                      replacements=(), go_version="go1.27.3", sandbox="process")


def spec_of(n: int) -> BuildSpec:
    """Return a distinct build spec (so a distinct build key) for each ``n``."""
    return dataclasses.replace(BASE_SPEC, caddy_version=f"v2.8.{n}")


# the scripted builder -----------------------------------------------------------------

SUCCEED = "succeed"


@dataclass
class Hold:
    """Block the build until the test finishes it; ``honour_cancel`` stops it on cancel.

    ``linger`` keeps a cancelled build in its sandbox until the test lets it go, as a
    sandbox that takes a while to die does.
    """

    honour_cancel: bool = True
    linger: bool = False


Outcome = str | Hold | BaseException


@dataclass
class Call:
    """One call of the builder: what the worker passed, and handles for the test."""

    key: str
    workdir: Path
    cancel: threading.Event
    log: LogSink
    finish_with: Outcome = SUCCEED
    finished: threading.Event = field(default_factory=threading.Event)
    returned: threading.Event = field(default_factory=threading.Event)

    def finish(self, outcome: Outcome = SUCCEED) -> None:
        """Let a held build end with ``outcome`` (or end a lingering cancelled one)."""
        self.finish_with = outcome
        self.finished.set()


class ScriptedBuilder:
    """The Builder as Worker calls it, doing per key what the test scripted."""

    def __init__(self, sandbox: ProcessSandbox) -> None:
        self.sandbox = sandbox
        self.calls: list[Call] = []
        self._scripts: dict[str, list[Outcome]] = {}
        #: per key, what stands for the build's fleet build cache session in its output
        self.caches: dict[str, Any] = {}
        self._lock = threading.Lock()

    def script(self, key: str, *outcomes: Outcome) -> None:
        """Have the next calls for ``key`` end with ``outcomes`` in turn (then succeed)."""
        self._scripts[key] = list(outcomes)

    def calls_for(self, key: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.key == key]

    def release_all(self) -> None:
        with self._lock:
            calls = list(self.calls)
        for c in calls:
            c.finish()

    def build(self, spec: BuildSpec, *, key: str, workdir: Path, log: LogSink,
              cancel: threading.Event) -> BuildOutput:
        call = Call(key, workdir, cancel, log)
        with self._lock:
            self.calls.append(call)
            script = self._scripts.get(key, [])
            outcome: Outcome = script.pop(0) if script else SUCCEED
        workdir.mkdir(parents=True)  # as the real builder does; the worker must remove it
        try:
            if isinstance(outcome, Hold):
                log("compile", "holding")
                outcome = self._hold(call, outcome)
            if isinstance(outcome, BaseException):
                raise outcome
            binary = workdir / "caddy"
            binary.write_bytes(f"caddy {spec.caddy_version} for {key}\n".encode())
            log("compile", "built")
            return BuildOutput(binary=binary, go_mod="module caddy\n", go_sum="",
                               timings={"compile": 0.01}, cache=self.caches.get(key))
        finally:
            call.returned.set()

    @staticmethod
    def _hold(call: Call, hold: Hold) -> Outcome:
        while not call.finished.wait(0.01):
            if hold.honour_cancel and call.cancel.is_set():
                if hold.linger:
                    call.finished.wait()
                raise Cancelled()
        return call.finish_with


# the harness --------------------------------------------------------------------------


class Started:
    """A Worker running in a thread; ``run()`` returning ends the thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"test-{worker.id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def ended(self) -> bool:
        return not self.thread.is_alive()

    def stop(self) -> None:
        """Call stop() and wait for run() to return."""
        self.worker.stop()
        self.join()

    def join(self) -> None:
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), f"worker {self.worker.id} did not stop"
        assert self.error is None, f"run() raised {self.error!r}"


class Kiln:
    """A queue, store and build log on a real database, and workers to run against them."""

    def __init__(self, db_url: str, root: Path) -> None:
        self.db_url = db_url
        self.root = root
        self.pool = ConnectionPool(db_url, min_size=1, max_size=8, kwargs={"autocommit": True},
                                   open=True)
        self.queue = QueueManager(self.pool)
        self.logs = BuildLogs(self.pool)
        self.log_writer = LogWriter(self.logs, flush_seconds=0.05)
        self.store = LocalStore(root / "store")
        self.work_root = root / "work"
        self.builder = ScriptedBuilder(
            ProcessSandbox(go=find_go(), cache_dir=root / "go-cache"))
        self.started: list[Started] = []

    def listen_to(self, url: str) -> Callable[[], psycopg.Connection]:
        return lambda: psycopg.connect(url, autocommit=True)

    def worker(self, name: str = "w1", *, listen_url: str = "", **settings: Any) -> Worker:
        options: dict[str, Any] = {"concurrency": 2, **FAST, **settings}
        return Worker(queue=self.queue, builder=self.builder,  # type: ignore[arg-type]
                      store=self.store, listen=self.listen_to(listen_url or self.db_url),
                      work_root=self.work_root, worker_id=name,
                      log_sinks=self.log_writer, **options)

    def start(self, name: str = "w1", **settings: Any) -> Started:
        started = Started(self.worker(name, **settings))
        self.started.append(started)
        wait_for(f"worker {name} to register", lambda: self.worker_row(name), WAIT_SECONDS,
                 0.01)
        return started

    def close(self) -> None:
        for s in self.started:
            s.worker.stop()
        self.builder.release_all()
        for s in self.started:
            s.thread.join(WAIT_SECONDS)
        self.log_writer.close()
        self.pool.close()

    # what users and operators see

    def enqueue(self, spec: BuildSpec, *, max_attempts: int = 3) -> str:
        """Queue ``spec`` keyed as the API keys it: with the workers' sandbox and Go."""
        sandbox = self.builder.sandbox
        return self.enqueue_as_is(dataclasses.replace(
            spec, sandbox=sandbox.identity, go_version=sandbox.go_version()),
            max_attempts=max_attempts)

    def enqueue_as_is(self, spec: BuildSpec, *, max_attempts: int = 3) -> str:
        """Queue ``spec`` with the sandbox and Go it names."""
        self.queue.enqueue(spec.key(), spec.to_dict(), max_attempts=max_attempts)
        return spec.key()

    def build(self, key: str) -> Build:
        row = self.queue.get(key)
        assert row is not None
        return row

    def state(self, key: str) -> str:
        return str(self.build(key).state)

    def attempts(self, key: str) -> list[tuple[int, str, str, str | None]]:
        return [(a["number"], a["worker_id"], a["outcome"], a["error"])
                for a in self.queue.attempts(key)]

    def worker_row(self, worker_id: str) -> dict[str, Any] | None:
        return next((w for w in self.queue.list_workers() if w["id"] == worker_id), None)

    def result_lines(self, key: str) -> list[tuple[int, str]]:
        self.log_writer.flush(force=True)
        return [(x.attempt, x.line) for x in self.logs.iter_lines(key) if x.step == RESULT_STEP]

    def workdirs(self) -> list[Path]:
        return sorted(self.work_root.iterdir()) if self.work_root.exists() else []

    def wait_results(self, key: str, count: int) -> list[tuple[int, str]]:
        """Wait for ``count`` result lines in the log of ``key`` (written after the state)."""
        def found() -> list[tuple[int, str]] | None:
            lines = self.result_lines(key)
            return lines if len(lines) >= count else None

        return wait_for(f"{count} result line(s) of {key[:12]}", found,  # type: ignore[no-any-return]
                        WAIT_SECONDS, 0.02)

    def wait_done(self, call: Call) -> None:
        """Wait until the worker is done with ``call``: it returned and its workdir is gone."""
        wait_for("the worker to finish with the build",
                 lambda: call.returned.is_set() and not call.workdir.exists(), WAIT_SECONDS, 0.01)

    def wait_state(self, key: str, state: str) -> None:
        wait_for(f"build {key[:12]} to be {state}", lambda: self.state(key) == state,
                 WAIT_SECONDS, 0.02)

    def wait_call(self, key: str, number: int = 1) -> Call:
        calls = wait_for(f"build call {number} of {key[:12]}",
                         lambda: self.builder.calls_for(key)[number - 1:], WAIT_SECONDS, 0.01)
        return calls[0]  # type: ignore[no-any-return]

    def take_lease(self, key: str, by: str) -> None:
        """Let the lease of ``key`` run out and have worker ``by`` claim it, at one commit.

        The janitor's requeue and another worker's claim, in one transaction, so that the
        worker under test cannot extend the lease or claim the build back in between.
        """
        with psycopg.connect(self.db_url, autocommit=True) as conn, conn.transaction():
            conn.execute("UPDATE kiln_builds SET lease_expires_at = now() - interval '1 second'"
                         " WHERE key = %(key)s", {"key": key})
            requeued = conn.execute(queries()["requeue_expired"]).fetchall()
            assert [r[0] for r in requeued] == [key]
            sandbox = self.builder.sandbox
            claimed = conn.execute(queries()["claim"], {
                "worker_id": by, "limit": 1, "lease_seconds": LEASE_SECONDS,
                "sandbox": sandbox.identity, "go_version": sandbox.go_version()})
            assert [r[0] for r in claimed.fetchall()] == [key]


@pytest.fixture
def kiln(db_url: str, tmp_path: Path) -> Iterator[Kiln]:
    k = Kiln(db_url, tmp_path)
    try:
        yield k
    finally:
        k.close()


# tests --------------------------------------------------------------------------------


def test_builds_and_stores_the_artifact_then_leaves(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1))
    started = kiln.start("w1")

    kiln.wait_state(key, "succeeded")
    build = kiln.build(key)
    with kiln.store.open(build.artifact_path) as f:
        stored = f.read()
    assert stored == f"caddy v2.8.1 for {key}\n".encode()
    assert build.artifact_size == len(stored)
    assert build.artifact_sha256 == file_sha256(kiln.store.root / build.artifact_path)
    assert build.artifact_path.endswith(spec_of(1).filename)
    assert build.attempts == 1 and build.error is None
    assert kiln.attempts(key) == [(1, "w1", "succeeded", None)]
    assert kiln.wait_results(key, 1) == [
        (1, f"succeeded: {len(stored)} bytes, sha256 {build.artifact_sha256}")]

    row = kiln.worker_row("w1")
    assert row is not None
    assert row["state"] == "active" and row["stopped_at"] is None
    assert row["sandbox"] == kiln.builder.sandbox.identity and row["running"] == 0
    kiln.wait_done(kiln.builder.calls_for(key)[0])

    started.stop()
    row = kiln.worker_row("w1")
    assert row is not None
    assert row["state"] == "gone" and row["stopped_at"] is not None


def test_stop_hands_a_running_build_back_without_spending_an_attempt(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1), max_attempts=1)
    kiln.builder.script(key, Hold(linger=True))
    first = kiln.start("w1")
    call = kiln.wait_call(key)
    assert kiln.build(key).worker_id == "w1"

    first.worker.stop()
    wait_for("the build to be told to stop", call.cancel.is_set, WAIT_SECONDS, 0.01)
    # the worker says it is draining while its sandbox is still being stopped
    wait_for("the worker to be draining",
             lambda: (kiln.worker_row("w1") or {}).get("state") == "draining",
             WAIT_SECONDS, 0.01)
    assert not first.ended()
    call.finish()
    first.join()

    build = kiln.build(key)
    assert build.state == "queued" and build.worker_id is None
    assert build.attempts == 0  # not spent: max_attempts=1 still allows a build
    assert kiln.attempts(key) == [(1, "w1", "preempted", None)]
    assert kiln.result_lines(key) == [(1, "worker stopped; build handed back to the queue")]
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "gone"
    assert not kiln.workdirs()

    kiln.start("w2")
    kiln.wait_state(key, "succeeded")
    assert kiln.build(key).attempts == 1
    assert kiln.attempts(key) == [(1, "w1", "preempted", None), (2, "w2", "succeeded", None)]


def test_cancel_notification_stops_the_running_build(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold())
    # no heartbeat within the test: only the kiln_cancel notification can stop the build
    started = kiln.start("w1", heartbeat_seconds=NO_HEARTBEAT_SECONDS)
    call = kiln.wait_call(key)

    assert kiln.queue.cancel(key, reason="cancelled by an administrator") is not None
    wait_for("the build to be told to stop", call.cancel.is_set, WAIT_SECONDS, 0.01)
    kiln.wait_done(call)

    build = kiln.build(key)
    assert build.state == "cancelled" and build.error == "cancelled by an administrator"
    assert build.artifact_path is None
    assert kiln.attempts(key) == [(1, "w1", "cancelled", "cancelled by an administrator")]
    assert kiln.result_lines(key) == [(1, "cancelled; the sandbox was stopped")]

    other = kiln.enqueue(spec_of(2))  # the worker goes on
    kiln.wait_state(other, "succeeded")
    assert not started.ended()
    assert len(kiln.builder.calls_for(key)) == 1


def test_a_missed_cancel_notification_is_caught_by_the_heartbeat(
        kiln: Kiln, pg_server_url: str) -> None:
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold())
    # the listener watches another database, so it hears nothing: no kiln_cancel, and new
    # builds are found by polling
    started = kiln.start("w1", listen_url=pg_server_url)
    call = kiln.wait_call(key)

    kiln.queue.cancel(key, reason="cancelled by its owner")
    wait_for("the build to be told to stop", call.cancel.is_set, WAIT_SECONDS, 0.01)
    kiln.wait_done(call)

    build = kiln.build(key)
    assert build.state == "cancelled" and build.error == "cancelled by its owner"
    assert kiln.attempts(key) == [(1, "w1", "cancelled", "cancelled by its owner")]
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "active" and row["running"] == 0

    other = kiln.enqueue(spec_of(2))
    kiln.wait_state(other, "succeeded")
    assert not started.ended()
    assert kiln.state(key) == "cancelled"


def test_a_lost_lease_stops_the_build_and_leaves_the_new_attempt_alone(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold())
    started = kiln.start("w1")
    call = kiln.wait_call(key)

    kiln.take_lease(key, by="w2")
    wait_for("the build to be told to stop", call.cancel.is_set, WAIT_SECONDS, 0.01)
    kiln.wait_done(call)

    build = kiln.build(key)
    assert build.state == "running" and build.worker_id == "w2"
    assert kiln.attempts(key) == [(1, "w1", "lost", "lease expired"), (2, "w2", "running", None)]
    assert kiln.result_lines(key) == []
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "active" and row["running"] == 0
    assert not started.ended()


def test_a_build_that_ends_after_its_lease_was_taken_is_not_recorded(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold(honour_cancel=False))
    # no heartbeat within the test: the worker cannot know, and its completion must be refused
    started = kiln.start("w1", heartbeat_seconds=NO_HEARTBEAT_SECONDS)
    call = kiln.wait_call(key)

    kiln.take_lease(key, by="w2")
    call.finish(SUCCEED)
    kiln.wait_done(call)

    build = kiln.build(key)
    assert build.state == "running" and build.worker_id == "w2"
    assert build.artifact_path is None
    assert kiln.attempts(key) == [(1, "w1", "lost", "lease expired"), (2, "w2", "running", None)]
    assert kiln.result_lines(key) == []
    assert not started.ended()


def test_a_worker_that_claims_back_its_lost_build_stops_the_old_attempt(kiln: Kiln) -> None:
    # A worker cut off from the database for a lease: the janitor requeues its build, and
    # on reconnecting the worker's listener wakes its claim loop before its next heartbeat,
    # so the worker claims the same build again while the first attempt still runs.
    key = kiln.enqueue(spec_of(1))
    kiln.builder.script(key, Hold(), Hold())
    kiln.start("w1", heartbeat_seconds=NO_HEARTBEAT_SECONDS)
    old = kiln.wait_call(key, 1)

    with psycopg.connect(kiln.db_url, autocommit=True) as conn:
        conn.execute("UPDATE kiln_builds SET lease_expires_at = now() - interval '1 second'"
                     " WHERE key = %(key)s", {"key": key})
    assert [r["key"] for r in kiln.queue.requeue_expired()] == [key]
    new = kiln.wait_call(key, 2)
    assert kiln.attempts(key) == [(1, "w1", "lost", "lease expired"), (2, "w1", "running", None)]

    # the first attempt runs on to the end (had it been told to stop, this changes nothing)
    old.finish(SUCCEED)
    kiln.wait_done(old)

    assert old.cancel.is_set(), "the lost first attempt was never told to stop"
    assert kiln.state(key) == "running", "the lost first attempt's result was recorded"
    assert kiln.attempts(key) == [(1, "w1", "lost", "lease expired"), (2, "w1", "running", None)]
    new.finish(SUCCEED)
    kiln.wait_state(key, "succeeded")
    assert kiln.attempts(key) == [(1, "w1", "lost", "lease expired"),
                                  (2, "w1", "succeeded", None)]


def test_an_unexpected_exception_is_retried_and_the_worker_goes_on(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1), max_attempts=2)
    kiln.builder.script(key, RuntimeError("sandbox vanished"))
    started = kiln.start("w1")

    kiln.wait_state(key, "succeeded")
    assert kiln.attempts(key) == [(1, "w1", "failed", "internal error: sandbox vanished"),
                                  (2, "w1", "succeeded", None)]
    assert kiln.wait_results(key, 2)[0] == (1, "failed: internal error: sandbox vanished")

    last = kiln.enqueue(spec_of(2), max_attempts=1)
    kiln.builder.script(last, RuntimeError("sandbox vanished again"))
    kiln.wait_state(last, "failed")
    build = kiln.build(last)
    assert build.error == "internal error: sandbox vanished again"
    assert build.error_kind == "retryable"  # asking for it again builds it again

    after = kiln.enqueue(spec_of(3))
    kiln.wait_state(after, "succeeded")
    assert not started.ended()
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "active"


def test_build_failures_are_retried_only_when_retrying_may_help(kiln: Kiln) -> None:
    final = kiln.enqueue(spec_of(1), max_attempts=3)
    kiln.builder.script(final, BuildFailure("go: module example.com/nope: 404 Not Found",
                                            retryable=False))
    flaky = kiln.enqueue(spec_of(2), max_attempts=2)
    kiln.builder.script(flaky, BuildFailure("dial tcp: i/o timeout", retryable=True),
                        BuildFailure("dial tcp: i/o timeout", retryable=True))
    kiln.start("w1")

    kiln.wait_state(final, "failed")
    build = kiln.build(final)
    assert build.error == "go: module example.com/nope: 404 Not Found"
    assert build.error_kind == "permanent" and build.attempts == 1
    assert kiln.wait_results(final, 1) == [(1, "failed: go: module example.com/nope: 404 Not Found")]

    kiln.wait_state(flaky, "failed")
    build = kiln.build(flaky)
    assert build.error == "dial tcp: i/o timeout"
    assert build.error_kind == "retryable" and build.attempts == 2
    assert [a[2] for a in kiln.attempts(flaky)] == ["failed", "failed"]


def test_a_huge_failure_message_is_stored_and_logged_capped(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1), max_attempts=1)
    message = "go: " + "x" * (5 * 1024 * 1024)
    kiln.builder.script(key, BuildFailure(message, retryable=False))
    kiln.start("w1")

    kiln.wait_state(key, "failed")
    error = kiln.build(key).error
    assert error is not None and error.startswith("go: xxx")
    assert len(error) <= 8 * 1024
    kept, _, cut = error.rpartition("… (")
    assert cut.endswith(" bytes cut)")
    assert len(kept) + int(cut.removesuffix(" bytes cut)")) == len(message)  # all ASCII
    [(_, _, _, attempt_error)] = kiln.attempts(key)
    assert attempt_error == error
    [(_, line)] = kiln.wait_results(key, 1)
    assert line == f"failed: {error}"


def test_a_build_keyed_with_another_sandbox_or_go_waits_for_a_worker_that_has_them(
        kiln: Kiln) -> None:
    # BASE_SPEC names the sandbox "process" and go1.27.3: not what this worker runs
    assert kiln.builder.sandbox.identity != BASE_SPEC.sandbox
    other_sandbox = kiln.enqueue_as_is(dataclasses.replace(
        spec_of(1), go_version=kiln.builder.sandbox.go_version()))
    other_go = kiln.enqueue_as_is(dataclasses.replace(
        spec_of(2), sandbox=kiln.builder.sandbox.identity, go_version="go1.2.3"))
    own = kiln.enqueue(spec_of(3))
    kiln.start("w1")

    kiln.wait_state(own, "succeeded")
    threading.Event().wait(float(FAST["poll_seconds"]) * 3)  # polls come and go
    for key in (other_sandbox, other_go):
        build = kiln.build(key)
        assert build.state == "queued" and build.attempts == 0 and build.worker_id is None
        assert kiln.builder.calls_for(key) == []


def test_max_jobs_ends_run_after_that_many_builds(kiln: Kiln) -> None:
    keys = [kiln.enqueue(spec_of(n)) for n in range(3)]
    worker = kiln.worker("w1", concurrency=2, max_jobs=2)
    started = Started(worker)
    kiln.started.append(started)
    started.join()  # without stop()

    states = sorted(kiln.state(k) for k in keys)
    assert states == ["queued", "succeeded", "succeeded"]
    assert len(kiln.builder.calls) == 2
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "gone"


def test_idle_exit_ends_run_once_nothing_came_for_that_long(kiln: Kiln) -> None:
    key = kiln.enqueue(spec_of(1))
    begun = time.monotonic()
    started = Started(kiln.worker("w1", idle_exit=0.5))
    kiln.started.append(started)
    started.join()  # without stop()

    assert time.monotonic() - begun >= 0.5
    assert kiln.state(key) == "succeeded"  # idle means idle after the work, not instead of it
    row = kiln.worker_row("w1")
    assert row is not None and row["state"] == "gone"


def test_claims_no_more_builds_than_its_concurrency_then_the_next_as_one_ends(
        kiln: Kiln) -> None:
    keys = [kiln.enqueue(spec_of(n)) for n in (1, 2, 3)]
    for key in keys:
        kiln.builder.script(key, Hold())
    kiln.start("w1", concurrency=2)
    wait_for("two builds to run", lambda: sorted(kiln.state(k) for k in keys)
             == ["queued", "running", "running"], WAIT_SECONDS, 0.02)
    # polls and notifications come and go; the third build still waits for a slot
    time_to_poll = float(FAST["poll_seconds"]) * 3
    threading.Event().wait(time_to_poll)
    assert sorted(kiln.state(k) for k in keys) == ["queued", "running", "running"]
    first = next(k for k in keys if kiln.state(k) == "running")
    waiting = next(k for k in keys if kiln.state(k) == "queued")
    kiln.builder.calls_for(first)[0].finish()
    kiln.wait_state(first, "succeeded")
    kiln.wait_state(waiting, "running")  # the freed slot takes the queued build
    # (the claim marks it running a moment before the worker calls the builder)
    wait_for("the third build to start", lambda: len(kiln.builder.calls) == 3,
             WAIT_SECONDS, 0.01)


class SlowPublish:
    """A build's cache session whose publication to the fleet takes until the test lets go."""

    def __init__(self) -> None:
        self.publishing = threading.Event()
        self.release = threading.Event()
        self.published = self.discarded = False

    def publish(self) -> int:
        self.publishing.set()
        self.release.wait(WAIT_SECONDS * 2)
        self.published = True
        return 1

    def discard(self) -> None:
        self.discarded = True


def test_publishing_the_build_cache_frees_the_slot_and_is_not_a_lost_build(
        kiln: Kiln, caplog: pytest.LogCaptureFixture) -> None:
    # a cold real Caddy build publishes thousands of entries for seconds after it succeeded:
    # meanwhile its slot must take the next build, and the heartbeat must not take the
    # finished build for one this worker lost
    first, second = kiln.enqueue(spec_of(1)), kiln.enqueue(spec_of(2))
    kiln.builder.script(first, SUCCEED)
    kiln.builder.script(second, Hold())
    kiln.builder.caches[first] = publish = SlowPublish()
    kiln.start("w1", concurrency=1)
    assert publish.publishing.wait(WAIT_SECONDS)
    assert kiln.state(first) == "succeeded"
    kiln.wait_state(second, "running")  # claimed while the first one still publishes
    heartbeats = float(FAST["heartbeat_seconds"]) * 3
    threading.Event().wait(heartbeats)
    assert not any("taken away" in r.getMessage() for r in caplog.records)
    publish.release.set()
    wait_for("the second build to start", lambda: kiln.builder.calls_for(second),
             WAIT_SECONDS, 0.01)
    assert publish.published and not publish.discarded
    kiln.builder.calls_for(second)[0].finish()
    kiln.wait_state(second, "succeeded")
    assert [a[2] for a in kiln.attempts(first)] == ["succeeded"]
