"""Slots for held connections: held downloads and live event streams, per API process.

A held ``/api/download`` and an open ``/api/builds/{key}/events`` stream each keep one of
the process's threads (or greenlets) for as long as they last. A `SlotTable` counts them,
per client and in all, and refuses one past either cap with a 503, so that the process
keeps threads for ``/healthz`` and ordinary requests whatever a crowd of idle clients
does. The table is the process's own: the caps hold per API process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import falcon

from kiln.api.errors import ApiError
from kiln.api.principal import address_group, principal_of

#: what a slot is held for
Kind = Literal["download", "stream"]
KINDS: tuple[Kind, ...] = ("download", "stream")
#: seconds a refused client is asked to wait before it asks again
RETRY_AFTER_SECONDS = 10
#: what the caps are called in the configuration (and in the messages)
GLOBAL_CAP = "api.max_held"
CLIENT_CAP = "api.max_held_per_client"


class SlotsFull(ApiError):
    """A 503: the client, or the whole process, holds as many connections as allowed."""

    def __init__(self, *, cap: str, limit: int, advice: str,
                 retry_after: int = RETRY_AFTER_SECONDS) -> None:
        if cap == CLIENT_CAP:
            held = (f"you already hold {limit} held downloads and live log streams on this "
                    f"API process ({cap} is {limit}); close one (or wait for it to end)")
        else:
            held = (f"this API process already holds {limit} held downloads and live log "
                    f"streams ({cap} is {limit}; the rest of its threads are kept for "
                    "ordinary requests)")
        message = f"{held}, then ask again in {retry_after}s"
        if advice:
            message += f"; {advice}"
        super().__init__(falcon.HTTP_503, message, headers={"Retry-After": str(retry_after)})
        self.cap = cap
        self.limit = limit


class Slot:
    """One held connection; `release` gives it back (once, however often it is called)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        """Give the slot back."""
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def held(self) -> bool:
        return self._release is not None


class SlotTable:
    """Count held connections per client and in all; refuse one past either cap."""

    def __init__(self, *, limit: int, per_client: int,
                 retry_after: int = RETRY_AFTER_SECONDS) -> None:
        self.limit = limit
        self.per_client = per_client
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._clients: Counter[str] = Counter()
        self._kinds: Counter[Kind] = Counter()

    def acquire(self, client: str, kind: Kind, *, advice: str = "") -> Slot:
        """Take a slot for ``client``; raise SlotsFull (a 503) past a cap."""
        with self._lock:
            if sum(self._kinds.values()) >= self.limit:
                cap, limit = GLOBAL_CAP, self.limit
            elif self._clients[client] >= self.per_client:
                cap, limit = CLIENT_CAP, self.per_client
            else:
                self._clients[client] += 1
                self._kinds[kind] += 1
                return Slot(lambda: self._give_back(client, kind))
        raise SlotsFull(cap=cap, limit=limit, advice=advice, retry_after=self.retry_after)

    @contextmanager
    def hold(self, client: str, kind: Kind, *, advice: str = "") -> Iterator[Slot]:
        """Hold a slot for the block, giving it back however the block ends."""
        slot = self.acquire(client, kind, advice=advice)
        try:
            yield slot
        finally:
            slot.release()

    def _give_back(self, client: str, kind: Kind) -> None:
        with self._lock:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]
            self._kinds[kind] -= 1

    def held(self, kind: Kind | None = None) -> int:
        """Return how many slots are held now (of one kind, or in all)."""
        with self._lock:
            return self._kinds[kind] if kind is not None else sum(self._kinds.values())

    def held_by(self, client: str) -> int:
        """Return how many slots ``client`` holds now."""
        with self._lock:
            return self._clients.get(client, 0)


class HeldStream:
    """A response body that gives its slot back when the server closes it.

    A WSGI server calls ``close()`` on the body when the response ends, the client goes
    away or the write fails, even when the body was never iterated (a generator's own
    ``finally`` would not run then).
    """

    def __init__(self, body: Iterator[bytes], slot: Slot) -> None:
        self.body = body
        self.slot = slot

    def __iter__(self) -> HeldStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.body)
        except BaseException:
            self.slot.release()
            raise

    def close(self) -> None:
        """Close the body, then give the slot back."""
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.slot.release()


def client_of(req: falcon.Request) -> str:
    """Return whom a held connection is counted against: the key, else the address (/64)."""
    principal = principal_of(req)
    if principal.key is not None:
        return f"key:{principal.key.id}"
    return f"addr:{address_group(principal.address)}"
