"""Webhooks without services: the callback address rules, and how a delivery is signed."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from kiln.api.errors import ApiError
from kiln.api.groups import Callbacks
from kiln.janitor.webhooks import SIGNATURE_HEADER, Deliverer, verify_body
from kiln.request.callbacks import CallbackRefused, check_callback_url


def resolving_to(*addresses: str) -> Any:
    """Return a getaddrinfo stand-in that answers ``addresses`` for any host."""
    def resolve(host: str, port: int, **_kw: Any) -> list[Any]:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]
    return resolve


# IPv6 forms that carry an IPv4 address; each embeds one Kiln must not call
EMBEDDED_PRIVATE = [
    "64:ff9b::7f00:1",            # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",         # NAT64 of 169.254.169.254 (cloud metadata)
    "64:ff9b::a00:1",             # NAT64 of 10.0.0.1
    "64:ff9b:1::a00:1",           # local-use NAT64 prefix (RFC 8215)
    "::127.0.0.1",                # IPv4-compatible
    "::169.254.169.254",
    "::ffff:10.1.2.3",            # IPv4-mapped
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",             # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",          # 6to4 of 169.254.169.254
    "2002:c0a8:101::1",           # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE)
def test_ipv6_literals_embedding_a_private_ipv4_address_are_refused(address: str) -> None:
    with pytest.raises(CallbackRefused, match="private, loopback or link-local"):
        check_callback_url(f"http://[{address}]/hook", allow_private=False)


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE)
def test_host_names_resolving_to_such_addresses_are_refused(address: str) -> None:
    # the same check runs again before each delivery, on what the name resolves to then
    with pytest.raises(CallbackRefused, match="private, loopback or link-local"):
        check_callback_url("https://hooks.example/x", allow_private=False,
                           resolve=resolving_to("1.1.1.1", address))


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:1.1.1.1",
                                     "2606:4700:4700::1111"])
def test_ipv6_forms_of_public_addresses_are_accepted(address: str) -> None:
    assert check_callback_url(f"http://[{address}]/hook", allow_private=False)


def test_allow_private_accepts_embedded_forms_too() -> None:
    assert check_callback_url("http://[64:ff9b::7f00:1]/", allow_private=True)


# -- a subscription's secret signs its deliveries ------------------------------------------


class NoDatabase:
    """A WebhookManager stand-in for code paths that must not reach the database."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the database was used ({name})")


def test_each_delivery_is_signed_with_its_own_subscriptions_secret() -> None:
    deliverer = Deliverer(manager=NoDatabase(), allow_private=False)  # type: ignore[arg-type]
    row = {"id": 7, "build_key": "k", "url": "https://a.example/hook",
           "base_url": "https://kiln.example", "attempts": 1, "secret": "secret-of-a",
           "payload": {"key": "k" * 64, "state": "failed", "error": "boom"}}
    body = deliverer.body(row)
    headers = deliverer.headers(row, body)
    assert verify_body("secret-of-a", body, headers[SIGNATURE_HEADER])
    other = deliverer.headers({**row, "secret": "secret-of-b"}, body)
    assert not verify_body("secret-of-a", body, other[SIGNATURE_HEADER])
    # a subscription made before secrets were per subscription is sent unsigned
    assert SIGNATURE_HEADER not in deliverer.headers({**row, "secret": None}, body)


def test_links_are_made_from_the_stored_public_url() -> None:
    deliverer = Deliverer(manager=NoDatabase(), allow_private=False)  # type: ignore[arg-type]
    key = "a" * 64
    row = {"id": 1, "build_key": key, "url": "https://a.example/", "attempts": 1,
           "base_url": "https://kiln.example/", "secret": "s",
           "payload": {"key": key, "state": "succeeded", "spec": {}}}
    links = json.loads(deliverer.body(row))["links"]
    assert links["self"] == f"https://kiln.example/api/builds/{key}"
    assert links["artifact"] == f"https://kiln.example/api/builds/{key}/artifact"


def test_without_a_public_url_callbacks_are_refused_naming_the_setting() -> None:
    callbacks = Callbacks(webhooks=NoDatabase(), allow_private=True,  # type: ignore[arg-type]
                          public_url="")
    with pytest.raises(ApiError) as raised:
        callbacks.check({"callback_url": "http://127.0.0.1:9/hook"})
    assert raised.value.field == "callback_url"
    assert "api.public_url" in raised.value.message
    assert callbacks.check({}) is None  # a request without a callback is not affected


def test_a_checked_callback_gets_a_fresh_secret() -> None:
    tokens = iter(["first", "second"])
    callbacks = Callbacks(webhooks=NoDatabase(), allow_private=True,  # type: ignore[arg-type]
                          public_url="https://kiln.example", token=lambda: next(tokens))
    one = callbacks.check({"callback_url": "http://127.0.0.1:9/hook"})
    two = callbacks.check({"callback_url": "http://127.0.0.1:9/hook"})
    assert one is not None and two is not None
    assert one.document() == {"url": "http://127.0.0.1:9/hook", "secret": "first"}
    assert two.secret == "second"
