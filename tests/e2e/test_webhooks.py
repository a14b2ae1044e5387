"""End to end: several platforms in one request, and webhooks received by a real server.

The callbacks go to an ``http.server`` on 127.0.0.1 (allowed here with
``webhooks.allow_private``); the janitor delivers them, each signed (HMAC-SHA256) with the
secret its request was answered with, and linking to ``api.public_url``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg_pool import ConnectionPool

from kiln.db.api_keys import KeyManager
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow

MAX_ATTEMPTS = 3
#: ELF e_machine of each architecture built here
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """An HTTP server that records every POST and answers with a status chosen per path."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    #: path -> statuses to answer in turn (the last one repeats); default 200
    plans: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def posts(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.posts(path)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{path}: {len(self.posts(path))} callbacks, expected {count}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            r = holder["r"]
            with r.lock:
                r.received.append(Received(self.path, dict(self.headers.items()), body))
                plan = r.plans.get(self.path, [200])
                status = plan.pop(0) if len(plan) > 1 else plan[0]
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder["r"]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_WEBHOOKS__ALLOW_PRIVATE": "true",
            "KILN_WEBHOOKS__INTERVAL": "0.2", "KILN_WEBHOOKS__RETRY_BASE_SECONDS": "0.3",
            "KILN_WEBHOOKS__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "KILN_WEBHOOKS__TIMEOUT": "5"}


def start_with_janitor(service: KilnProcesses) -> None:
    """Start a worker, the janitor (which delivers webhooks) and the API, at its public URL."""
    service.env["KILN_API__PUBLIC_URL"] = service.url
    service.start_worker()
    service.wait_for_worker()
    service.start_janitor()
    service.start_api()


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_with_janitor


def wait_group(kiln: KilnProcesses, gid: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = requests.get(f"{kiln.url}/api/groups/{gid}", timeout=10).json()
        if doc["state"] not in ("queued", "running"):
            return doc
        time.sleep(0.3)
    raise AssertionError(f"group {gid} still {doc.get('state')}:\n" + kiln.log("worker")[-3000:])


def signed_correctly(post: Received, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), post.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(post.headers.get("X-Kiln-Signature", ""), expected)


def webhook_of(resp: requests.Response, url: str) -> str:
    """Check the answer names the callback and its new secret; return the secret."""
    webhook = resp.json()["webhook"]
    assert webhook["url"] == url and len(webhook["secret"]) >= 32, webhook
    return str(webhook["secret"])


def webhook_rows(kiln: KilnProcesses, key: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(kiln.env["KILN_DATABASE__URL"]) as conn:
        return conn.execute("SELECT url, state, attempts, last_status FROM kiln_webhooks "
                            "WHERE build_key = %s ORDER BY id", (key,)).fetchall()


def test_several_platforms_build_each_and_each_finish_is_called_back(
        kiln: KilnProcesses, receiver: Receiver) -> None:
    body = {"platforms": [{"os": "linux", "arch": "amd64"}, {"os": "linux", "arch": "arm64"}],
            "caddy_version": "v2.8.0", "plugins": [f"{gp.HELLO}@v0.1.0"],
            "callback_url": receiver.url + "/hook"}
    resp = kiln.post_build(body)
    assert resp.status_code == 202, resp.text
    secret = webhook_of(resp, receiver.url + "/hook")
    group = resp.json()
    assert resp.headers["Location"] == f"/api/groups/{group['id']}"
    assert [(b["os"], b["arch"]) for b in group["builds"]] == [("linux", "amd64"),
                                                               ("linux", "arm64")]
    keys = [b["key"] for b in group["builds"]]
    assert len(set(keys)) == 2

    done = wait_group(kiln, group["id"])
    assert done["state"] == "succeeded", done
    for build in done["builds"]:
        binary = requests.get(kiln.url + build["links"]["artifact"], timeout=60).content
        assert binary[:4] == b"\x7fELF"
        assert int.from_bytes(binary[18:20], "little") == ELF_MACHINE[build["arch"]]
        assert hashlib.sha256(binary).hexdigest() == build["artifact"]["sha256"]

    posts = receiver.wait("/hook", 2)
    assert len(posts) == 2
    by_key = {p.doc["key"]: p for p in posts}
    assert set(by_key) == set(keys)
    for build in done["builds"]:
        post = by_key[build["key"]]
        assert signed_correctly(post, secret)
        assert post.headers["Content-Type"] == "application/json"
        assert post.headers["X-Kiln-Event"] == "build.finished"
        doc = post.doc
        assert (doc["state"], doc["error"]) == ("succeeded", None)
        assert doc["sha256"] == build["artifact"]["sha256"]
        assert doc["filename"] == f"caddy_linux_{build['arch']}_custom"
        # links are absolute, at api.public_url, and they work
        assert doc["links"]["artifact"] == f"{kiln.url}/api/builds/{build['key']}/artifact"
        checksum = requests.get(doc["links"]["checksum"], timeout=10)
        assert checksum.text.startswith(build["artifact"]["sha256"] + "  ")
    for key in keys:
        assert webhook_rows(kiln, key) == [(receiver.url + "/hook", "delivered", 1, 200)]

    # the same request again: the same group, done at once, and called back at once, signed
    # with the new request's own secret
    again = kiln.post_build({**body, "callback_url": receiver.url + "/again"})
    assert again.status_code == 200 and again.json()["id"] == group["id"]
    again_secret = webhook_of(again, receiver.url + "/again")
    assert again_secret != secret
    posts = receiver.wait("/again", 2)
    assert {p.doc["key"] for p in posts} == set(keys)
    assert all(signed_correctly(p, again_secret) and not signed_correctly(p, secret)
               for p in posts)


def test_a_failed_build_is_called_back_and_retried_until_answered(
        kiln: KilnProcesses, receiver: Receiver) -> None:
    receiver.plans["/flaky"] = [503, 200]
    resp = kiln.post_build({"os": "linux", "arch": "amd64", "plugins": [gp.BROKEN],
                            "callback_url": receiver.url + "/flaky"})
    key = resp.json()["key"]
    secret = webhook_of(resp, receiver.url + "/flaky")
    first, second = receiver.wait("/flaky", 2)
    assert first.body == second.body  # a retry sends the same document, signed the same
    assert signed_correctly(first, secret) and signed_correctly(second, secret)
    doc = second.doc
    assert (doc["key"], doc["state"]) == (key, "failed")
    assert "broken.go" in doc["error"]
    assert "artifact" not in doc["links"] and doc["sha256"] is None
    deadline = time.monotonic() + 10
    while webhook_rows(kiln, key)[0][1] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert webhook_rows(kiln, key) == [(receiver.url + "/flaky", "delivered", 2, 200)]


def test_a_receiver_that_never_answers_2xx_is_given_up_after_max_attempts(
        kiln: KilnProcesses, receiver: Receiver) -> None:
    receiver.plans["/down"] = [500]
    resp = kiln.post_build({"os": "linux", "arch": "amd64", "plugins": [gp.BROKEN],
                            "callback_url": receiver.url + "/down"})
    key = resp.json()["key"]
    deadline = time.monotonic() + 30
    rows = webhook_rows(kiln, key)
    while not any(r[1] == "failed" for r in rows) and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = webhook_rows(kiln, key)
    down = [r for r in rows if r[0].endswith("/down")]
    assert down == [(receiver.url + "/down", "failed", MAX_ATTEMPTS, 500)]
    time.sleep(1.0)  # nothing more is sent once it gave up
    assert len(receiver.posts("/down")) == MAX_ATTEMPTS


def test_callback_urls_are_checked_before_anything_is_queued(
        kiln: KilnProcesses, tmp_path: Path, proxy_dir: Path, go_cache_dir: Path) -> None:
    def builds() -> int:
        with psycopg.connect(kiln.env["KILN_DATABASE__URL"]) as conn:
            return int(conn.execute("SELECT count(*) FROM kiln_builds").fetchone()[0])  # type: ignore[index]

    before = builds()
    for url, words in (("ftp://127.0.0.1/hook", "http:// or https://"),
                       ("http://user:pw@127.0.0.1/", "credentials")):
        resp = kiln.post_build({"os": "linux", "arch": "amd64", "callback_url": url})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["field"] == "callback_url" and words in error["message"]
    # an API that keeps the default (webhooks.allow_private: false), on the same database
    strict = KilnProcesses(db_url=kiln.env["KILN_DATABASE__URL"], root=tmp_path,
                           goproxy=f"file://{proxy_dir}", cache_dir=go_cache_dir)
    try:
        strict.env["KILN_API__PUBLIC_URL"] = strict.url
        strict.start_api()
        for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/",
                    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/"):
            resp = strict.post_build({"platforms": [{"os": "linux", "arch": "amd64"}],
                                      "callback_url": url})
            assert resp.status_code == 400, (url, resp.text)
            assert "private, loopback or link-local" in resp.json()["error"]["message"]
    finally:
        strict.close()
    # an API that does not know its public URL cannot link to a build: it takes no callback
    bare = KilnProcesses(db_url=kiln.env["KILN_DATABASE__URL"], root=tmp_path / "bare",
                         goproxy=f"file://{proxy_dir}", cache_dir=go_cache_dir,
                         env={"KILN_WEBHOOKS__ALLOW_PRIVATE": "true"})
    try:
        bare.start_api()
        resp = bare.post_build({"os": "linux", "arch": "amd64",
                                "callback_url": "https://hooks.example/x"})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["field"] == "callback_url" and "api.public_url" in error["message"]
    finally:
        bare.close()
    assert builds() == before


def test_each_requester_of_a_build_is_called_back_with_its_own_secret(
        kiln: KilnProcesses, receiver: Receiver) -> None:
    pool = ConnectionPool(kiln.env["KILN_DATABASE__URL"], min_size=1, max_size=1, open=True,
                          kwargs={"autocommit": True})
    try:
        keys = KeyManager(pool)
        tokens = [keys.create(name)[1] for name in ("hooks-alice", "hooks-bob")]
    finally:
        pool.close()
    body = {"os": "linux", "arch": "arm64", "plugins": [gp.BROKEN],
            "callback_url": receiver.url + "/shared"}
    answers = [kiln.post_build(body, headers={"Authorization": f"Bearer {token}",
                                              # links never come from the Host header
                                              "Host": "attacker.example"})
               for token in tokens]
    assert len({a.json()["key"] for a in answers}) == 1
    secrets = [webhook_of(a, receiver.url + "/shared") for a in answers]
    assert secrets[0] != secrets[1]
    posts = receiver.wait("/shared", 2)
    assert len(posts) == 2
    # each receiver can tell its own delivery: exactly one post verifies with each secret
    for secret in secrets:
        assert sum(signed_correctly(p, secret) for p in posts) == 1
    for post in posts:
        assert post.doc["links"]["self"].startswith(kiln.url + "/api/builds/")


def test_groups_that_do_not_exist(kiln: KilnProcesses) -> None:
    missing = requests.get(f"{kiln.url}/api/groups/g_{'0' * 32}", timeout=10)
    assert missing.status_code == 404 and "no group" in missing.json()["error"]["message"]
    bad = requests.get(f"{kiln.url}/api/groups/nonsense", timeout=10)
    assert bad.status_code == 404 and "not a group id" in bad.json()["error"]["message"]
