"""Callback URLs a build request may name, and the addresses Kiln refuses to call."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kiln.errors import KilnError

SIGNATURE_HEADER = "X-Kiln-Signature"
MAX_URL_LENGTH = 2048
#: random bytes of a subscription's secret (hex-encoded: twice as many characters)
SECRET_BYTES = 32
AddressResolver = Callable[..., list[Any]]


def new_secret() -> str:
    """Return a fresh random secret for one webhook subscription."""
    return secrets.token_hex(SECRET_BYTES)


@dataclass(frozen=True)
class Webhook:
    """A callback a request named, and the secret that signs the deliveries made for it.

    The secret is given to the requester once, in the answer to its request; a receiver
    that checks X-Kiln-Signature with it knows the delivery is for that request.
    """

    url: str
    secret: str

    def document(self) -> dict[str, str]:
        """Return the ``webhook`` member of the answer to the request."""
        return {"url": self.url, "secret": self.secret}


class CallbackRefused(KilnError, ValueError):
    """A callback URL Kiln will not call; the message says what to change."""


#: IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64 (RFC 6052) and the
#: deprecated IPv4-compatible form ``::a.b.c.d``; a translator or tunnel reaches that address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
#: local-use NAT64 (RFC 8215): the IPv4 address sits where the operator chose; never global
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Return the IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # the server, and the client the packet is bound for
    return found


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # the IPv4 address itself, reached over the IPv4 stack
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in LOCAL_NAT64:
            return False
        # the embedded address is where the packet ends up, so it must be public too
        if not all(v4.is_global and not v4.is_multicast for v4 in embedded_ipv4(ip)):
            return False
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int, *, allow_private: bool,
                 resolve: AddressResolver = socket.getaddrinfo) -> list[str]:
    """Return the addresses of ``host``; refuse non-public ones unless ``allow_private``."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise CallbackRefused(f"callback_url host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise CallbackRefused(f"callback_url host {host!r} has no address")
    if not allow_private:
        private = [a for a in addresses if not _is_public(a)]
        if private:
            raise CallbackRefused(
                f"callback_url host {host!r} is a private, loopback or link-local address "
                f"({private[0]}): use a public address (operators: webhooks.allow_private)")
    return addresses


def check_callback_url(url: object, *, allow_private: bool,
                       resolve: AddressResolver = socket.getaddrinfo) -> str:
    """Return ``url`` if Kiln may POST to it; raise CallbackRefused saying why not."""
    if not isinstance(url, str) or not url:
        raise CallbackRefused("callback_url must be a string like https://example.com/hook")
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is over {MAX_URL_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise CallbackRefused("callback_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:  # e.g. an unclosed [IPv6 literal
        raise CallbackRefused(f"callback_url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise CallbackRefused("callback_url must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("leave credentials out of callback_url; check the "
                              f"{SIGNATURE_HEADER} header instead")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefused("callback_url has an invalid port") from None
    if not host:
        raise CallbackRefused("callback_url has no host")
    resolve_host(host, port, allow_private=allow_private, resolve=resolve)
    return url
