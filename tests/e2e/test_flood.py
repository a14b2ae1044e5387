"""A connection flood: held downloads and live streams past the caps, and stream lifetimes.

The API runs with few threads and small caps. One client opens held event streams on a
build that stays queued (its worker registered, then stopped) until it is refused; another
fills the process's cap. Past the caps: 503 with Retry-After and a JSON error naming the
cap, while /healthz and a download of a binary already built still answer. Closing the
streams gives the slots back. Separately, a stream ends by itself after
api.max_stream_seconds with a comment saying to reconnect, and resuming repeats nothing.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow

THREADS = 8
MAX_HELD = 4
PER_CLIENT = 3
#: generous: the machine may be busy; nothing here asserts how fast
TIMEOUT = 10.0
CLIENT_A, CLIENT_B, CLIENT_C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
BUILT = {"os": "linux", "arch": "amd64", "version": "v2.8.0", "p": f"{gp.HELLO}@v0.2.0"}
QUEUED = {"os": "linux", "arch": "arm64", "version": "v2.8.0", "p": f"{gp.HELLO}@v0.2.0"}


def api_env() -> dict[str, str]:
    return {
        "KILN_API__THREADS": str(THREADS),
        "KILN_API__MAX_HELD": str(MAX_HELD),
        "KILN_API__MAX_HELD_PER_CLIENT": str(PER_CLIENT),
        # a held download waits for the stopped worker instead of answering 502
        "KILN_API__WORKER_WAIT": "600",
        # a stream whose client left is noticed at the next keep-alive it fails to write
        "KILN_BUILD_LOGS__KEEPALIVE_SECONDS": "1",
    }


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return api_env()


def start_small_api(service: KilnProcesses) -> None:
    service.start_worker()
    service.wait_for_worker()
    service.start_api(threads=THREADS)


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_small_api


def download_url(kiln: KilnProcesses, params: dict[str, str]) -> str:
    return f"{kiln.url}/api/download?{urllib.parse.urlencode(params)}"


@dataclass(frozen=True)
class Flood:
    kiln: KilnProcesses
    #: a build that stays queued: no worker runs any more
    queued: str


@pytest.fixture(scope="module")
def flood(kiln: KilnProcesses) -> Flood:
    """Build one binary, stop the worker, and queue a build nothing will run."""
    built = requests.get(download_url(kiln, BUILT), timeout=300)
    assert built.status_code == 200, built.text
    kiln.stop("worker")
    resp = kiln.post_build({"os": QUEUED["os"], "arch": QUEUED["arch"],
                            "caddy_version": QUEUED["version"], "plugins": [QUEUED["p"]]})
    assert resp.status_code == 202, resp.text
    return Flood(kiln, resp.json()["key"])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def open_stream(kiln: KilnProcesses, key: str, source: str) -> tuple[socket.socket, Answer]:
    """Open /api/builds/{key}/events from ``source``; return the socket and what came first.

    A 200 is read up to the stream's opening comment (the stream is then held); anything
    else is read whole.
    """
    sock = socket.create_connection(("127.0.0.1", kiln.port), timeout=TIMEOUT,
                                    source_address=(source, 0))
    sock.sendall(f"GET /api/builds/{key}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if status == 200:
        while b"kiln build" not in body:
            chunk = sock.recv(65536)
            assert chunk, "the stream closed before its opening comment"
            body += chunk
    else:
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed inside the body"
            body += chunk
    return sock, Answer(status, headers, body)


def assert_refused(answer: Answer, cap: str) -> str:
    """Check a 503 past a cap: Retry-After, and a JSON error naming the cap; return it."""
    assert answer.status == 503, answer
    assert int(answer.headers["retry-after"]) > 0
    message = json.loads(answer.body)["error"]["message"]
    assert f"{cap} is" in message and "ask again" in message, message
    return str(message)


def held_streams(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('kiln_api_held_connections{kind="stream"}'):
            return float(line.split()[-1])
    raise AssertionError("kiln_api_held_connections is not in /metrics")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_past_the_caps_held_requests_are_refused_and_the_api_still_answers(
        flood: Flood, sockets: list[socket.socket]) -> None:
    kiln, key = flood.kiln, flood.queued
    # one client fills its own cap
    mine = []
    for _ in range(PER_CLIENT):
        sock, answer = open_stream(kiln, key, CLIENT_A)
        sockets.append(sock)
        mine.append(sock)
        assert answer.status == 200, answer
    sock, answer = open_stream(kiln, key, CLIENT_A)
    sockets.append(sock)
    assert_refused(answer, "api.max_held_per_client")
    # a held download counts against the same cap; its build goes on
    refused = requests.get(download_url(kiln, QUEUED), timeout=TIMEOUT)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    message = refused.json()["error"]["message"]
    assert "api.max_held_per_client is" in message and key in message, message
    # another client fills the process's cap; a third is refused by it
    sock, answer = open_stream(kiln, key, CLIENT_B)
    sockets.append(sock)
    assert answer.status == 200, answer
    sock, answer = open_stream(kiln, key, CLIENT_C)
    sockets.append(sock)
    assert_refused(answer, "api.max_held")

    # the threads kept back still serve health checks and binaries already built
    health = requests.get(kiln.url + "/healthz", timeout=TIMEOUT)
    assert health.status_code == 200, health.text
    built = requests.get(download_url(kiln, BUILT), timeout=TIMEOUT)
    assert built.status_code == 200, built.text
    assert built.content[:4] == b"\x7fELF"
    assert requests.get(f"{kiln.url}/api/builds/{key}", timeout=TIMEOUT).json()["state"] \
        == "queued"
    metrics = requests.get(kiln.url + "/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200
    assert held_streams(metrics.text) == MAX_HELD

    # closing the streams gives their slots back
    for sock in mine:
        sock.close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        sock, answer = open_stream(kiln, key, CLIENT_A)
        sockets.append(sock)
        if answer.status == 200:
            break
        assert time.monotonic() < deadline, f"the closed streams' slots came not back: {answer}"
        sock.close()
        time.sleep(0.2)


# --------------------------------------------------------------------------------------
# A stream's lifetime


@pytest.fixture(scope="module")
def short_streams(flood: Flood, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[KilnProcesses]:
    """A second API on the same database whose streams last two seconds."""
    kiln = flood.kiln
    other = KilnProcesses(db_url=kiln.env["KILN_DATABASE__URL"],
                          root=tmp_path_factory.mktemp("flood-short"),
                          goproxy=kiln.env["KILN_BUILD__GOPROXY"],
                          cache_dir=Path(kiln.env["KILN_BUILD__CACHE_DIR"]),
                          env={**api_env(), "KILN_API__MAX_STREAM_SECONDS": "2"})
    try:
        other.start_api(threads=THREADS)
        yield other
    finally:
        other.close()


def read_stream(resp: requests.Response) -> str:
    """Read a stream to its end (the server must end it)."""
    return b"".join(resp.iter_content(chunk_size=None)).decode()


def test_a_stream_ends_after_its_lifetime_and_resumes_where_it_was(
        flood: Flood, short_streams: KilnProcesses) -> None:
    url = f"{short_streams.url}/api/builds/{flood.queued}/events"
    with requests.get(url, stream=True, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200, resp.text
        first = read_stream(resp)
    assert "event: state" in first
    assert "reconnect with Last-Event-ID" in first, first
    assert "api.max_stream_seconds" in first, first
    ids = [line[4:] for line in first.splitlines() if line.startswith("id: ")]
    assert ids, first
    # an EventSource reconnects with the last id it saw: nothing it saw is sent again
    with requests.get(url, stream=True, timeout=TIMEOUT,
                      headers={"Last-Event-ID": ids[-1]}) as resp:
        assert resp.status_code == 200, resp.text
        second = read_stream(resp)
    assert "event: state" not in second, second
    assert "reconnect with Last-Event-ID" in second, second
