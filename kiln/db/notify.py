"""One LISTEN connection per API process, fanning notifications out to waiting requests.

Held downloads and live-log watchers wait on a ``Subscription`` instead of holding a
database connection each: a thousand waiters cost one connection. When the connection
drops, every subscriber is woken (so it re-reads the database: the poll fallback) and the
listener reconnects and LISTENs again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

import psycopg

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0
#: how often the listener thread checks whether it must stop
TICK_SECONDS = 1.0
#: sentinel delivered to subscribers when notifications may have been missed
RESYNC = "__resync__"


def payload_key(payload: str) -> str:
    """Return the build key a notification is about (JSON ``key`` field, or the payload)."""
    if payload.startswith("{"):
        try:
            return str(json.loads(payload)["key"])
        except (ValueError, KeyError, TypeError):
            return ""
    return payload


class Subscription:
    """Notifications on one channel about one key, queued until read."""

    def __init__(self, notifier: Notifier, channel: str, key: str, *,
                 inbox: queue.SimpleQueue[str] | None = None) -> None:
        self.notifier = notifier
        self.channel = channel
        self.key = key
        # subscriptions may share an inbox, so one waiter hears several channels
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue() if inbox is None else inbox

    def deliver(self, payload: str) -> None:
        self._queue.put(payload)

    def wait(self, timeout: float) -> str | None:
        """Return the next payload (or RESYNC), or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop receiving notifications."""
        self.notifier.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Notifier:
    """LISTEN on channels once per process and hand notifications to subscribers by key."""

    def __init__(self, connect: Callable[[], psycopg.Connection], *,
                 channels: Iterable[str]) -> None:
        self.connect = connect
        self.channels = tuple(channels)
        self._subs: dict[tuple[str, str], set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()

    def subscribe(self, channel: str, key: str, *,
                  inbox: queue.SimpleQueue[str] | None = None) -> Subscription:
        """Start receiving notifications about ``key`` on ``channel`` (into ``inbox``)."""
        if channel not in self.channels:
            raise ValueError(f"not listening on {channel}")
        self._ensure_started()
        sub = Subscription(self, channel, key, inbox=inbox)
        with self._lock:
            self._subs[(channel, key)].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        with self._lock:
            subs = self._subs.get((sub.channel, sub.key))
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[(sub.channel, sub.key)]

    def subscribers(self) -> int:
        """Return how many subscriptions are open."""
        with self._lock:
            return sum(len(s) for s in self._subs.values())

    def stop(self) -> None:
        """Stop the listener thread."""
        self._stop.set()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="kiln-notifier",
                                                daemon=True)
                self._thread.start()

    def _broadcast(self, payload: str) -> None:
        with self._lock:
            everyone = [s for subs in self._subs.values() for s in subs]
        for sub in everyone:
            sub.deliver(payload)

    def _dispatch(self, channel: str, payload: str) -> None:
        key = payload_key(payload)
        with self._lock:
            subs = list(self._subs.get((channel, key), ()))
        for sub in subs:
            sub.deliver(payload)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.connect() as conn:
                    for channel in self.channels:
                        conn.execute(f"LISTEN {channel}")
                    self.connected.set()
                    # anything sent while we were away was missed: make waiters re-read
                    self._broadcast(RESYNC)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=TICK_SECONDS):
                            self._dispatch(note.channel, note.payload)
            except psycopg.Error as exc:
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning("notification listener lost its connection, reconnecting: %s", exc)
                self._broadcast(RESYNC)
                self._stop.wait(RECONNECT_SECONDS)
        self.connected.clear()


QUEUE_CHANNEL = "kiln_queue"
EVENTS_CHANNEL = "kiln_events"
#: payload: the key of a running build that was cancelled; its worker stops it
CANCEL_CHANNEL = "kiln_cancel"


def parse_event(payload: str) -> tuple[str, str]:
    """Return (key, state) from a kiln_events payload."""
    data = json.loads(payload)
    return data["key"], data["state"]
