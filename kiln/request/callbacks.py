"""Callback URLs a build request may name, and the addresses Kiln refuses to call."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from kiln.errors import KilnError

SIGNATURE_HEADER = "X-Kiln-Signature"
MAX_URL_LENGTH = 2048
AddressResolver = Callable[..., list[Any]]


class CallbackRefused(KilnError, ValueError):
    """A callback URL Kiln will not call; the message says what to change."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
