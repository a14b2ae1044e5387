"""Webhooks on a real PostgreSQL: subscriptions (one per requester, each with its own
secret) and their delivery to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.api.groups import Callbacks
from kiln.api.principal import Principal
from kiln.db.webhooks import WebhookManager
from kiln.janitor.webhooks import Deliverer

KEY = hashlib.sha256(b"webhooks").hexdigest()
URL = "http://127.0.0.1:9/hook"
PUBLIC_URL = "https://kiln.example"


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True},
                          open=True)
    try:
        with pool.connection() as conn:
            conn.execute("INSERT INTO kiln_builds (key, spec) VALUES (%s, %s)",
                         (KEY, Jsonb({"os": "linux", "arch": "amd64"})))
        yield pool
    finally:
        pool.close()


def finish(pool: ConnectionPool) -> None:
    with pool.connection() as conn:
        conn.execute("UPDATE kiln_builds SET state = 'failed', error = 'boom', "
                     "finished_at = now() WHERE key = %s", (KEY,))


def test_two_requesters_of_one_build_and_url_each_get_their_delivery(
        pool: ConnectionPool) -> None:
    manager = WebhookManager(pool)
    tokens = iter(["secret-a", "secret-b", "secret-a2"])
    callbacks = Callbacks(webhooks=manager, allow_private=True, public_url=PUBLIC_URL,
                          token=lambda: next(tokens))
    alice, bob = Principal(address="192.0.2.1"), Principal(address="192.0.2.2")
    for who in (alice, bob):
        webhook = callbacks.check({"callback_url": URL})
        assert webhook is not None
        callbacks.subscribe(webhook, KEY, principal=who)
    # alice asks again: still one subscription for her, signed with her newest secret
    again = callbacks.check({"callback_url": URL})
    assert again is not None
    callbacks.subscribe(again, KEY, principal=alice)

    finish(pool)
    assert manager.fire() == 2
    rows = manager.claim(limit=10, lease_seconds=60)
    by_secret = {r["secret"]: r for r in rows}
    assert set(by_secret) == {"secret-a2", "secret-b"}
    assert {r["requester"] for r in rows} == {alice.requester, bob.requester}
    assert {(r["url"], r["base_url"]) for r in rows} == {(URL, PUBLIC_URL)}


def test_links_never_come_from_the_request(pool: ConnectionPool) -> None:
    manager = WebhookManager(pool)
    callbacks = Callbacks(webhooks=manager, allow_private=True, public_url=PUBLIC_URL + "/")
    webhook = callbacks.check({"callback_url": URL})
    assert webhook is not None
    callbacks.subscribe(webhook, KEY, principal=Principal(address="192.0.2.1"))
    finish(pool)
    manager.fire()
    (row,) = manager.claim(limit=10, lease_seconds=60)
    assert row["base_url"] == PUBLIC_URL


def test_secrets_are_not_listed_with_a_builds_callbacks(pool: ConnectionPool,
                                                        db_url: str) -> None:
    manager = WebhookManager(pool)
    manager.subscribe(KEY, URL, base_url=PUBLIC_URL, requester="addr:192.0.2.1",
                      secret="hidden")
    (listed,) = manager.for_build(KEY)
    assert "secret" not in listed and listed["url"] == URL
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT secret FROM kiln_webhooks").fetchone() == ("hidden",)


# -- delivery: the address checked is the address called; redirects are not followed -------


class Answers:
    """A resolver for Kiln's ``resolve`` hook: names answer the addresses a test sets.

    It stands for DNS, which a subscriber controls: the same name may answer a public
    address when the build is requested and a private one when the delivery is made.
    """

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        self.asked.append(host)
        if host not in self.addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in self.addresses[host]]


class Receiver:
    """An HTTP server on 127.0.0.1 that records what is POSTed to it."""

    def __init__(self, status: int = 204, location: str = "") -> None:
        self.status = status
        self.location = location
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append((self.path, dict(self.headers), body))
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Stay quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(status: int = 204, location: str = "") -> Receiver:
        made.append(Receiver(status, location))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


#: a public address (TEST-NET would be refused as reserved: this one is global)
PUBLIC_ADDRESS = "93.184.215.14"


def subscribe_and_finish(pool: ConnectionPool, url: str, *, answers: Answers,
                         allow_private: bool) -> None:
    """Have the API take ``url`` as a build's callback, then finish the build."""
    callbacks = Callbacks(webhooks=WebhookManager(pool), allow_private=allow_private,
                          public_url=PUBLIC_URL, resolve=answers)
    webhook = callbacks.check({"callback_url": url})
    assert webhook is not None
    callbacks.subscribe(webhook, KEY, principal=Principal(address="192.0.2.1"))
    finish(pool)


def deliver(pool: ConnectionPool, answers: Answers, *, allow_private: bool,
            max_attempts: int = 8) -> dict[str, Any]:
    """Run one janitor sweep; return the build's one delivery as its owner lists it."""
    Deliverer(manager=WebhookManager(pool), allow_private=allow_private, timeout=10,
              max_attempts=max_attempts, retry_base_seconds=60, resolve=answers).run_once()
    (row,) = WebhookManager(pool).for_build(KEY)
    return row


def test_a_host_that_turns_private_after_the_request_is_not_called(
        pool: ConnectionPool, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    url = f"http://hooks.example:{receiver.port}/hook"
    answers = Answers()
    answers.addresses["hooks.example"] = [PUBLIC_ADDRESS]
    subscribe_and_finish(pool, url, answers=answers, allow_private=False)

    # by delivery time the subscriber's DNS points the name at this machine
    answers.addresses["hooks.example"] = ["127.0.0.1"]
    row = deliver(pool, answers, allow_private=False)
    assert receiver.received == []
    assert row["state"] == "failed"  # refused for good: another attempt cannot change it
    assert row["attempts"] == 1 and row["last_status"] is None
    assert "private, loopback or link-local address (127.0.0.1)" in row["last_error"]
    assert answers.asked == ["hooks.example", "hooks.example"]  # request time, delivery


def test_a_name_that_answers_a_public_and_a_private_address_is_not_called(
        pool: ConnectionPool, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    answers = Answers()
    answers.addresses["hooks.example"] = [PUBLIC_ADDRESS]
    subscribe_and_finish(pool, f"http://hooks.example:{receiver.port}/hook",
                         answers=answers, allow_private=False)
    answers.addresses["hooks.example"] = [PUBLIC_ADDRESS, "127.0.0.1"]
    row = deliver(pool, answers, allow_private=False)
    assert receiver.received == []
    assert row["state"] == "failed" and "(127.0.0.1)" in row["last_error"]


def test_the_delivery_connects_to_the_address_it_checked(
        pool: ConnectionPool, receivers: Callable[..., Receiver]) -> None:
    # hooks.example has no address in real DNS: only a connection to the checked address
    # (not a second lookup of the name) reaches the receiver
    receiver = receivers()
    answers = Answers()
    answers.addresses["hooks.example"] = ["127.0.0.1"]
    subscribe_and_finish(pool, f"http://hooks.example:{receiver.port}/hook?x=1",
                         answers=answers, allow_private=True)
    row = deliver(pool, answers, allow_private=True)
    assert row["state"] == "delivered" and row["last_status"] == 204, row
    ((path, headers, body),) = receiver.received
    assert path == "/hook?x=1"
    assert headers["Host"] == f"hooks.example:{receiver.port}"  # the name, not the address
    assert json.loads(body)["key"] == KEY
    assert answers.asked == ["hooks.example", "hooks.example"]


def test_a_redirect_is_not_followed_and_the_delivery_is_retried(
        pool: ConnectionPool, receivers: Callable[..., Receiver]) -> None:
    elsewhere = receivers()
    redirecting = receivers(302, f"http://127.0.0.1:{elsewhere.port}/stolen")
    answers = Answers()
    answers.addresses["hooks.example"] = ["127.0.0.1"]
    subscribe_and_finish(pool, f"http://hooks.example:{redirecting.port}/hook",
                         answers=answers, allow_private=True)
    row = deliver(pool, answers, allow_private=True, max_attempts=2)
    assert len(redirecting.received) == 1
    assert elsewhere.received == []
    # anything but a 2xx is retried later, with backoff
    assert row["state"] == "pending" and row["attempts"] == 1
    assert row["last_status"] == 302 and row["last_error"].startswith("HTTP 302")
    with pool.connection() as conn:  # the backoff has passed
        conn.execute("UPDATE kiln_webhooks SET next_attempt_at = now()")
    row = deliver(pool, answers, allow_private=True, max_attempts=2)
    assert row["state"] == "failed" and row["attempts"] == 2 and row["last_status"] == 302
    assert len(redirecting.received) == 2 and elsewhere.received == []
