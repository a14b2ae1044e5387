"""Live logs end to end: gunicorn, a worker process, PostgreSQL, NOTIFY, Server-Sent Events.

Watchers connect while the build is still queued (no worker runs yet), then a worker
starts: one watcher reads everything; one drops its connection every few events and
resumes with Last-Event-ID; a few hundred idle ones just wait, sharing the API's small
database pool.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, template_database

pytestmark = pytest.mark.slow

#: watchers that connect and wait; the API process gets a thread for each
IDLE_WATCHERS = 200
POOL_MAX = 2
CORE_STEPS = ("resolve", "fetch", "compile", "upload")


@dataclass
class Event:
    id: str
    event: str
    data: Any


def read_events(resp: requests.Response) -> Iterator[Event]:
    """Parse a text/event-stream response (comments and retry lines skipped)."""
    fields: dict[str, str] = {}
    for raw in resp.iter_lines(decode_unicode=False):
        line = raw.decode()
        if not line:
            if "event" in fields:
                yield Event(fields.get("id", ""), fields["event"], json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


@dataclass
class Watched:
    key: str
    kiln: KilnProcesses
    full: list[Event] = field(default_factory=list)
    resumed: list[Event] = field(default_factory=list)
    reconnects: int = 0
    after_result: int = 0
    idle_results: int = 0
    db_connections_while_idle: int = -1
    transactions_during_build: int = -1
    errors: list[str] = field(default_factory=list)


def api_connections(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'kiln-api%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def transactions(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def idle_watchers(kiln: KilnProcesses, key: str, count: int, opened: threading.Event,
                  finished: list[int], deadline: float) -> None:
    """Open ``count`` raw event streams; count those that see the result."""
    sel = selectors.DefaultSelector()
    request = (f"GET /api/builds/{key}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    buffers: dict[socket.socket, bytes] = {}
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", kiln.port), timeout=10)
        s.sendall(request)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        buffers[s] = b""
    # every stream has answered (headers and the opening comment) before the build starts
    waiting = set(buffers)
    while waiting and time.monotonic() < deadline:
        for sk, _ in sel.select(timeout=1):
            s = sk.fileobj  # type: ignore[assignment]
            buffers[s] += s.recv(65536)
            if b"kiln build" in buffers[s]:
                waiting.discard(s)
    opened.set()
    done = 0
    while buffers and time.monotonic() < deadline:
        for sk, _ in sel.select(timeout=1):
            s = sk.fileobj  # type: ignore[assignment]
            data = s.recv(65536)
            buffers[s] += data
            if b"event: result" in buffers[s] or not data:
                done += b"event: result" in buffers[s]
                sel.unregister(s)
                s.close()
                del buffers[s]
    for s in buffers:
        s.close()
    finished.append(done)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
            proxy_dir: Path, go_cache_dir: Path) -> Iterator[Watched]:
    """Run one build watched from before it starts; return what every watcher saw."""
    root = tmp_path_factory.mktemp("logs")
    name = "kiln_logs_e2e"
    db_url = template_database(pg_server_url, pg_template, name)
    kiln = KilnProcesses(db_url=db_url, root=root, goproxy=f"file://{proxy_dir}",
                         cache_dir=go_cache_dir,
                         env={"KILN_DATABASE__POOL_MAX": str(POOL_MAX),
                              "KILN_BUILD_LOGS__KEEPALIVE_SECONDS": "1",
                              # every watcher comes from one address: let them all in
                              "KILN_API__THREADS": str(IDLE_WATCHERS + 40),
                              "KILN_API__MAX_HELD": str(IDLE_WATCHERS + 20),
                              "KILN_API__MAX_HELD_PER_CLIENT": str(IDLE_WATCHERS + 20)})
    try:
        # a worker registers the toolchain build keys are made with, then goes away, so
        # the build below stays queued until watchers are connected
        kiln.start_worker("first")
        kiln.wait_for_worker("first")
        kiln.stop("first")
        kiln.start_api(threads=IDLE_WATCHERS + 40)
        resp = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
                                "plugins": [f"{gp.HELLO}@v0.2.0"]})
        assert resp.status_code == 202, resp.text
        key = resp.json()["key"]
        watched = Watched(key, kiln)
        events_url = f"{kiln.url}/api/builds/{key}/events"
        deadline = time.monotonic() + 300

        def full() -> None:
            with requests.get(events_url, stream=True, timeout=60) as r:
                for event in read_events(r):
                    watched.full.append(event)
                    if event.event == "result":
                        return

        def resumed() -> None:
            last = ""
            while time.monotonic() < deadline:
                headers = {"Last-Event-ID": last} if last else {}
                with requests.get(events_url, stream=True, timeout=60, headers=headers) as r:
                    if r.status_code == 204:
                        return
                    for got, event in enumerate(read_events(r), 1):
                        watched.resumed.append(event)
                        last = event.id
                        if event.event == "result" or got == 3:  # drop it mid-stream
                            break
                watched.reconnects += 1
                if watched.resumed[-1].event == "result":
                    # resuming after the result: the server says there is nothing more
                    again = requests.get(events_url, headers={"Last-Event-ID": last},
                                         timeout=30)
                    watched.after_result = again.status_code
                    return

        opened = threading.Event()
        finished: list[int] = []
        threads = [threading.Thread(target=f, daemon=True) for f in (full, resumed)]
        threads.append(threading.Thread(
            target=idle_watchers, args=(kiln, key, IDLE_WATCHERS, opened, finished, deadline),
            daemon=True))
        for t in threads:
            t.start()
        assert opened.wait(120), "the idle watchers could not all connect"
        time.sleep(0.5)
        watched.db_connections_while_idle = api_connections(db_url)
        assert requests.get(f"{kiln.url}/api/builds/{key}", timeout=10).json()["state"] == \
            "queued"
        before = transactions(db_url)
        kiln.start_worker()
        for t in threads:
            t.join(max(deadline - time.monotonic(), 1))
        watched.transactions_during_build = transactions(db_url) - before
        watched.idle_results = finished[0] if finished else -1
        yield watched
    finally:
        kiln.close()


def lines(events: list[Event]) -> list[tuple[int, int, str]]:
    return [(e.data["attempt"], e.data["seq"], e.data["line"]) for e in events
            if e.event == "log"]


def test_a_watcher_from_before_the_start_sees_every_line_in_order(watched: Watched) -> None:
    events = watched.full
    kinds = [e.event for e in events]
    assert kinds[0] == "state" and events[0].data["state"] == "queued"
    assert events[0].data["queue_position"] == 0
    states = [e.data["state"] for e in events if e.event == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    result = events[-1].data
    assert result["state"] == "succeeded" and len(result["artifact"]["sha256"]) == 64
    steps = [e.data["step"] for e in events if e.event == "step"]
    assert steps[0] == "resolve"
    assert all(a != b for a, b in zip(steps, steps[1:], strict=False))
    # the builder's steps, in order (more may come between them, e.g. inspecting the binary)
    assert [s for s in dict.fromkeys(steps) if s in CORE_STEPS] == list(CORE_STEPS)
    got = lines(events)
    assert [seq for _, seq, _ in got] == list(range(1, len(got) + 1))
    text = [line for _, _, line in got]
    assert any(line.startswith("$ go build") for line in text)
    assert text[-1].startswith("succeeded: ") and result["artifact"]["sha256"] in text[-1]
    # the running state, then the first step, then its first line
    first_log = kinds.index("log")
    assert [(e.event, e.data.get("state") or e.data.get("step"))
            for e in events[first_log - 2: first_log]] == [("state", "running"),
                                                           ("step", "resolve")]


def test_the_plain_text_log_has_the_same_lines(watched: Watched) -> None:
    resp = requests.get(f"{watched.kiln.url}/api/builds/{watched.key}/log", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.text.splitlines()
    # the same lines, with a marker where each step begins
    assert [line for line in text if not line.startswith("==> ")] == [
        line for _, _, line in lines(watched.full)]
    assert [line[4:] for line in text if line.startswith("==> ")] == [
        e.data["step"] for e in watched.full if e.event == "step"]


def test_reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(
        watched: Watched) -> None:
    assert watched.reconnects >= 5
    assert lines(watched.resumed) == lines(watched.full)
    steps = [e.data for e in watched.resumed if e.event == "step"]
    assert steps == [e.data for e in watched.full if e.event == "step"]
    states = [e.data["state"] for e in watched.resumed if e.event == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert [e.event for e in watched.resumed].count("result") == 1
    assert watched.after_result == 204


def test_idle_watchers_share_the_pool_and_all_get_the_result(watched: Watched) -> None:
    # 200 open streams; the API process holds its pool (at most POOL_MAX) + one LISTEN
    assert 1 <= watched.db_connections_while_idle <= POOL_MAX + 1
    assert watched.idle_results == IDLE_WATCHERS
    # watchers woken by the same notification share one read: without that, each of them
    # would run 3-4 queries on each of the build's notifications (4000 here)
    assert watched.transactions_during_build < 2 * IDLE_WATCHERS
