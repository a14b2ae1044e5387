"""Webhook subscriptions on a real PostgreSQL: one per requester, each with its own secret."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.api.groups import Callbacks
from kiln.api.principal import Principal
from kiln.db.webhooks import WebhookManager

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
