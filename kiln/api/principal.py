"""Who sent a request: an API key, or a client address (read through trusted proxies)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import falcon

from kiln.db.api_keys import ApiKey


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a key, or nobody in particular from a client address."""

    address: str
    key: ApiKey | None = None

    @property
    def is_admin(self) -> bool:
        return self.key is not None and self.key.is_admin

    @property
    def priority(self) -> int:
        return self.key.priority if self.key else 0

    @property
    def requester(self) -> str:
        """Return what is recorded as kiln_builds.requested_by: a key id or ``addr:<ip>``."""
        return self.key.id if self.key else f"addr:{self.address}"

    def describe(self) -> str:
        """Return a short human description for messages and logs."""
        return f"key {self.key.name} ({self.key.id})" if self.key else f"client {self.address}"


#: IPv6 clients are counted per /64: one host usually holds a whole /64
IPV6_PREFIX = 64
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> list[Network]:
    """Return the networks of ``api.trusted_proxies``."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """Return the client's address.

    That is the TCP peer, unless the peer is a trusted proxy: then X-Forwarded-For is read
    from the right (each proxy appends the address it saw) and the first hop that is not a
    trusted proxy is the client. A hop that is not an address stops the walk, since what lies
    before it cannot be believed.
    """
    address = _ip(peer)
    if address is None:
        return peer
    if not forwarded_for or not any(address in net for net in trusted):
        return str(address)
    for hop in reversed(forwarded_for.split(",")):
        ip = _ip(hop)
        if ip is None:
            break
        address = ip
        if not any(ip in net for net in trusted):
            break
    return str(address)


def address_group(address: str) -> str:
    """Return what a client address is counted as: itself, or its /64 for IPv6."""
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip) if ip is not None else address


def principal_of(req: falcon.Request) -> Principal:
    """Return who sent ``req`` (set by AuthMiddleware; anonymous if it did not run)."""
    principal = req.context.get("principal")
    if isinstance(principal, Principal):
        return principal
    return Principal(address=req.remote_addr or "")

