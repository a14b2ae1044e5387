"""A build's log as plain text, and live as Server-Sent Events.

``GET /api/builds/{key}/events`` replays the history, then follows the build: ``state``
(queued with its queue position, running with the attempt number, then the final state),
``step`` (resolve, fetch, compile, upload), ``log`` (one line each) and ``result`` (the
build document, after which the stream ends). Every event id encodes everything the client
has seen: the last line (attempt, seq), the current step and the last state shown. A client
that reconnects with ``Last-Event-ID`` therefore gets exactly what it missed: no line twice,
none lost, and a state event only if the state changed meanwhile.

An open stream holds a server thread (or greenlet) but no database connection: it waits on
the API process's one LISTEN connection (``kiln.db.notify``) and borrows a pooled connection
only to read what a notification announced. The thread is counted against the client's and
the process's caps on held connections (``kiln.api.held``; a 503 past them), and a stream
ends after ``api.max_stream_seconds`` with a comment saying to reconnect: an EventSource
reconnects with Last-Event-ID by itself and resumes where it was, in a fresh slot.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import falcon

from kiln.api.documents import build_document, load_build
from kiln.api.held import HeldStream, SlotTable, client_of
from kiln.db.build_logs import LOGS_CHANNEL, RESULT_STEP, BuildLogs, LogLine
from kiln.db.builds import FINAL_STATES, Build, QueueManager
from kiln.db.notify import EVENTS_CHANNEL, Notifier

KEEPALIVE_SECONDS = 15.0
#: how often a queued build's position is re-read (other builds' claims move it)
QUEUE_POLL_SECONDS = 3.0
#: how often anything is re-read when no notification comes (a missed one, a lost listener)
POLL_SECONDS = 30.0
#: how often everything is re-read when there is no notifier (tests, tools)
NO_NOTIFIER_POLL_SECONDS = 0.5
#: how long a finished build's stream waits for the attempt's last log lines
RESULT_GRACE_SECONDS = 5.0
#: seconds before a stream whose read failed tries again
ERROR_RETRY_SECONDS = 2.0
#: seconds a finished shared read is kept, and how many of each build
SWEEP_SECONDS = 60.0
KEEP_SNAPSHOTS = 4
#: how long a read waits for the rest of the watchers the same notification woke
COALESCE_SECONDS = 0.02
#: what an EventSource waits before reconnecting, milliseconds
RETRY_MS = 2000
#: lines read per query while catching up
PAGE_LINES = 500
#: seconds a stream lasts before it ends and asks its client to reconnect (api.max_stream_seconds)
MAX_STREAM_SECONDS = 600.0

log = logging.getLogger(__name__)

_STEP = re.compile(r"^[a-z]{0,16}$")
_STATE = re.compile(r"^([a-z]+-\d+)?$")


@dataclass(frozen=True)
class Cursor:
    """What a client has seen: the Last-Event-ID of a stream."""

    #: the last line delivered (0, 0: none)
    attempt: int = 0
    seq: int = 0
    #: the step of the last step event (or line)
    step: str = ""
    #: the last state event: "<state>-<queue position or attempt>"
    state: str = ""
    #: the result was delivered
    done: bool = False

    def encode(self) -> str:
        """Return the event id."""
        return ".".join([str(self.attempt), str(self.seq), self.step, self.state,
                         "end" if self.done else ""]).rstrip(".")

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """Read an event id; anything malformed means "from the start"."""
        parts = (text or "").strip().split(".")
        if len(parts) < 2 or len(parts) > 5:
            return cls()
        parts += [""] * (5 - len(parts))
        attempt, seq, step, state, end = parts
        if (not attempt.isdigit() or not seq.isdigit() or not _STEP.match(step)
                or not _STATE.match(state) or end not in ("", "end")
                or len(attempt) > 9 or len(seq) > 9):
            return cls()
        return cls(int(attempt), int(seq), step, state, end == "end")


def sse(event: str, data: Any, cursor: Cursor) -> bytes:
    """Return one Server-Sent Event."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {cursor.encode()}\nevent: {event}\ndata: {body}\n\n".encode()


def state_signature(state: str, *, attempt: int, position: int | None) -> str:
    """Return what distinguishes one state event from the next."""
    return f"{state}-{position if state == 'queued' and position is not None else attempt}"


@dataclass
class Snapshot:
    """What one read found: new lines after ``base``, then the build's state."""

    #: when the read started (BuildReader's clock)
    started: float
    base: tuple[int, int]
    ready: threading.Event = field(default_factory=threading.Event)
    lines: list[LogLine] = field(default_factory=list)
    row: Build | None = None
    attempt: int = 0
    position: int | None = None
    error: Exception | None = None


class BuildReader:
    """Read a build's new lines and state once for all the watchers the same news woke.

    A notification wakes every watcher of a build in this process at once; without this,
    each would run the same queries. A watcher asks for a read that started after its
    news arrived (``not_before``) from its cursor on; a read that qualifies, finished or
    still running, is shared.
    """

    def __init__(self, *, queue: QueueManager, logs: BuildLogs,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.queue = queue
        self.logs = logs
        self.clock = clock
        self.sleep = sleep
        # the last few reads of each key: watchers a little behind the others (still at
        # the previous cursor) keep finding theirs
        self._recent: dict[str, list[Snapshot]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def read(self, key: str, after: tuple[int, int], *, not_before: float) -> Snapshot:
        """Return a snapshot of ``key`` taken after ``not_before``, from ``after`` or earlier."""
        with self._lock:
            recent = self._recent.setdefault(key, [])
            snap = next((s for s in reversed(recent)
                         if s.started >= not_before and s.base <= after), None)
            mine = snap is None
            if snap is None:
                # start a little after the news arrived, once it has reached every
                # watcher of the build, so that they all find this read
                snap = Snapshot(started=max(self.clock(), not_before + COALESCE_SECONDS),
                                base=after)
                recent.append(snap)
                del recent[:-KEEP_SNAPSHOTS]
                self._sweep(snap.started)
        if mine:
            try:
                self.sleep(max(snap.started - self.clock(), 0.0))
                self._fetch(key, snap)
            except Exception as exc:
                snap.error = exc
            finally:
                snap.ready.set()
        else:
            snap.ready.wait()
        if snap.error is not None:
            raise snap.error
        return snap

    def _fetch(self, key: str, snap: Snapshot) -> None:
        # lines first: the state read next is then at least as new as they are, so the
        # "running" of an attempt is shown before its lines
        snap.lines = self.logs.lines_after(key, *snap.base, limit=PAGE_LINES)
        snap.row = self.queue.get(key)
        if snap.row is None:
            return
        snap.attempt = self.logs.latest_attempt(key)
        if snap.row.state == "queued":
            snap.position = self.queue.queue_position(key)

    def _sweep(self, now: float) -> None:
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        for key, recent in list(self._recent.items()):
            if all(s.ready.is_set() and now - s.started > SWEEP_SECONDS for s in recent):
                del self._recent[key]


class _StampedInbox(queue.SimpleQueue):  # type: ignore[type-arg]
    """An inbox that notes when each notification arrived."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put((time.monotonic(), item), block, timeout)


class BuildWatch:
    """One client's stream of a build's events, from a cursor on."""

    def __init__(self, *, key: str, cursor: Cursor, queue: QueueManager, logs: BuildLogs,
                 notifier: Notifier | None, reader: BuildReader | None = None,
                 keepalive: float = KEEPALIVE_SECONDS,
                 lifetime: float = MAX_STREAM_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.cursor = cursor
        self.queue = queue
        self.logs = logs
        self.notifier = notifier
        self.reader = reader or BuildReader(queue=queue, logs=logs)
        self.keepalive = keepalive
        self.lifetime = lifetime
        self.clock = clock
        self._final_since: float | None = None

    def finished_already(self) -> bool:
        """Return whether the client saw the result and nothing happened since."""
        if not self.cursor.done:
            return False
        row = self.queue.get(self.key)
        if row is None or row.state not in FINAL_STATES:
            return False
        if self.logs.lines_after(self.key, self.cursor.attempt, self.cursor.seq, limit=1):
            return False
        attempt = self.logs.latest_attempt(self.key)
        return state_signature(row.state, attempt=attempt, position=None) == self.cursor.state

    def events(self) -> Iterator[bytes]:
        """Yield the stream: history, then live events; end after the result."""
        inbox = _StampedInbox()
        # subscribe before the first read, so nothing announced in between is missed
        subs = [] if self.notifier is None else [
            self.notifier.subscribe(channel, self.key, inbox=inbox)
            for channel in (LOGS_CHANNEL, EVENTS_CHANNEL)
        ]
        try:
            yield f"retry: {RETRY_MS}\n: kiln build {self.key}\n\n".encode()
            last_sent = self.clock()
            ends = last_sent + self.lifetime
            if self.cursor.done:
                self.cursor = replace(self.cursor, done=False)
            not_before = time.monotonic()
            while True:
                try:
                    chunk, more, done, wait = self._advance(not_before)
                except Exception as exc:  # e.g. the database is away: keep the client
                    log.warning("live events of %s: %s", self.key, exc,
                                extra={"build_key": self.key})
                    chunk, more, done, wait = [], False, False, ERROR_RETRY_SECONDS
                if chunk:
                    yield b"".join(chunk)
                    last_sent = self.clock()
                if done:
                    return
                if self.clock() >= ends:
                    yield self._reconnect()
                    return
                not_before = time.monotonic()
                if more:
                    continue
                until_keepalive = self.keepalive - (self.clock() - last_sent)
                if until_keepalive <= 0:
                    yield b": keep-alive\n\n"
                    last_sent = self.clock()
                    until_keepalive = self.keepalive
                if self.notifier is None:
                    wait = min(wait, NO_NOTIFIER_POLL_SECONDS)
                try:
                    arrived, _ = inbox.get(timeout=max(
                        min(wait, until_keepalive, ends - self.clock()), 0.01))
                except queue.Empty:
                    continue
                # one read answers every notification that has piled up meanwhile, as
                # long as it started after the last of them arrived
                while not inbox.empty():
                    arrived, _ = inbox.get_nowait()
                not_before = arrived
        finally:
            for sub in subs:
                sub.close()

    def _reconnect(self) -> bytes:
        """Return the comment that ends a stream at the end of its lifetime."""
        return (f": this stream ends after {self.lifetime:g}s (api.max_stream_seconds); "
                f"reconnect with Last-Event-ID {self.cursor.encode()} to resume where it "
                "was\n\n").encode()

    def _advance(self, not_before: float) -> tuple[list[bytes], bool, bool, float]:
        """Read what is new; return (events, more to read, finished, seconds to wait)."""
        after = (self.cursor.attempt, self.cursor.seq)
        snap = self.reader.read(self.key, after, not_before=not_before)
        lines = [line for line in snap.lines if (line.attempt, line.seq) > after]
        more = len(snap.lines) == PAGE_LINES
        row = snap.row
        if row is None:  # deleted meanwhile: nothing more will come
            return [], False, True, 0.0
        state = row.state
        attempt, position = snap.attempt, snap.position
        # an attempt claimed since the state was read (or whose record was pruned)
        attempt = max([attempt, *(line.attempt for line in lines)])
        out: list[bytes] = []
        sig = state_signature(state, attempt=attempt, position=position)
        earlier = [line for line in lines if state != "running" or line.attempt < attempt]
        current = lines[len(earlier):]
        self._lines(earlier, out)
        if state not in FINAL_STATES:
            self._final_since = None
            if sig != self.cursor.state:
                self.cursor = replace(self.cursor, state=sig)
                out.append(sse("state", self._state_data(row, attempt, position), self.cursor))
            self._lines(current, out)
            return out, more, False, QUEUE_POLL_SECONDS if state == "queued" else POLL_SECONDS
        if more:
            return out, True, False, 0.0
        now = self.clock()
        if self._final_since is None:
            self._final_since = now
        finished_attempt = (self.cursor.attempt == attempt and self.cursor.step == RESULT_STEP)
        finished_at = row.finished_at
        recent = finished_at is None or (
            dt.datetime.now(dt.UTC) - finished_at).total_seconds() < RESULT_GRACE_SECONDS
        if (state in ("succeeded", "failed") and attempt and not finished_attempt and recent
                and now - self._final_since < RESULT_GRACE_SECONDS):
            # the worker writes an attempt's last lines just after recording its outcome
            return out, False, False, 0.25
        if sig != self.cursor.state:
            self.cursor = replace(self.cursor, state=sig)
            out.append(sse("state", self._state_data(row, attempt, None), self.cursor))
        self.cursor = replace(self.cursor, done=True)
        out.append(sse("result", build_document(row), self.cursor))
        return out, False, True, 0.0

    def _lines(self, lines: list[LogLine], out: list[bytes]) -> None:
        for line in lines:
            if line.step != self.cursor.step and line.step != RESULT_STEP:
                self.cursor = replace(self.cursor, step=line.step)
                out.append(sse("step", {"step": line.step, "attempt": line.attempt},
                               self.cursor))
            self.cursor = replace(self.cursor, attempt=line.attempt, seq=line.seq,
                                  step=line.step)
            out.append(sse("log", {"attempt": line.attempt, "seq": line.seq,
                                   "step": line.step, "line": line.line,
                                   "at": line.at.isoformat()}, self.cursor))

    @staticmethod
    def _state_data(row: Build, attempt: int, position: int | None) -> dict[str, Any]:
        data: dict[str, Any] = {"state": row.state, "attempt": attempt,
                                "max_attempts": row.max_attempts}
        if position is not None:
            data["queue_position"] = position
        if row.error:
            data["error"] = row.error
        return data


def render_log(lines: Iterator[LogLine]) -> Iterator[bytes]:
    """Yield a log as plain text, with a marker line where an attempt or a step begins."""
    attempt, step = 0, ""
    for line in lines:
        if line.attempt != attempt:
            if attempt:
                yield f"==> attempt {line.attempt}\n".encode()
            attempt, step = line.attempt, ""
        if line.step != step and line.step != RESULT_STEP:
            yield f"==> {line.step}\n".encode()
        step = line.step
        yield (line.line + "\n").encode()


class LogResource:
    """``/api/builds/{key}/log``: the log so far, as plain text."""

    def __init__(self, *, queue: QueueManager, logs: BuildLogs) -> None:
        self.queue = queue
        self.logs = logs

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row = load_build(self.queue, key)
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header("Cache-Control", "no-store" if row.state not in FINAL_STATES
                        else "no-cache")
        resp.stream = render_log(self.logs.iter_lines(key))


class EventsResource:
    """``/api/builds/{key}/events``: the build, live, as Server-Sent Events."""

    def __init__(self, *, queue: QueueManager, logs: BuildLogs, notifier: Notifier | None,
                 slots: SlotTable, keepalive: float = KEEPALIVE_SECONDS,
                 lifetime: float = MAX_STREAM_SECONDS) -> None:
        self.queue = queue
        self.logs = logs
        self.notifier = notifier
        self.slots = slots
        self.keepalive = keepalive
        self.lifetime = lifetime
        self.reader = BuildReader(queue=queue, logs=logs)

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        load_build(self.queue, key)
        # EventSource sends the header on reconnection; a query parameter serves the rest
        cursor = Cursor.parse(req.get_header("Last-Event-ID")
                              or req.get_param("last_event_id"))
        watch = BuildWatch(key=key, cursor=cursor, queue=self.queue, logs=self.logs,
                           notifier=self.notifier, reader=self.reader,
                           keepalive=self.keepalive, lifetime=self.lifetime)
        if watch.finished_already():
            # 204 tells an EventSource to stop reconnecting
            resp.status = falcon.HTTP_204
            return
        # the stream keeps a thread until it ends: a 503 past the caps, before any header
        slot = self.slots.acquire(client_of(req), "stream", advice=(
            f"the build's state is also at GET /api/builds/{key}, its log so far at "
            f"GET /api/builds/{key}/log"))
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-store")
        # proxies such as nginx must pass events on as they come
        resp.set_header("X-Accel-Buffering", "no")
        # given back when the server closes the body: at its end, or when the client left
        resp.stream = HeldStream(watch.events(), slot)


def add_routes(app: falcon.App, *, queue: QueueManager, logs: BuildLogs,
               notifier: Notifier | None, slots: SlotTable,
               keepalive: float = KEEPALIVE_SECONDS,
               lifetime: float = MAX_STREAM_SECONDS) -> None:
    """Serve the log routes."""
    app.add_route("/api/builds/{key}/log", LogResource(queue=queue, logs=logs))
    app.add_route("/api/builds/{key}/events", EventsResource(
        queue=queue, logs=logs, notifier=notifier, slots=slots, keepalive=keepalive,
        lifetime=lifetime))
