"""Webhooks: POST a signed JSON document to a build's ``callback_url`` when it finishes.

A request's callback is stored as 'subscribed' (sql/webhooks.sql, kiln_webhooks; 'waiting'
rows are those an API older than migration 0007 stored). The
janitor's ``deliver_webhooks`` job turns the callbacks of finished builds into 'pending'
deliveries with a snapshot of the outcome, then POSTs them, retrying with exponential
backoff until one answers 2xx or ``webhooks.max_attempts`` is spent. The body is signed
with the secret of the subscription it is for, which only its requester was given (in the
answer to its build request): ``X-Kiln-Signature: sha256=<hex HMAC-SHA256 of the body>``.
So a receiver can tell the deliveries meant for it from ones another requester had Kiln send
to the same URL. Links are absolute at ``api.public_url``, stored with the subscription.

Callback hosts are resolved when the build is requested and again before each delivery;
unless ``webhooks.allow_private`` is set, every address must be public, and the
connection goes to the address that was checked (a DNS answer cannot change in between).
Redirects are not followed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import random
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kiln.artifacts.provenance import kiln_version
from kiln.db.webhooks import WebhookManager
from kiln.errors import SpecError
from kiln.request.callbacks import SIGNATURE_HEADER, AddressResolver, CallbackRefused, resolve_host
from kiln.request.spec import BuildSpec

log = logging.getLogger(__name__)

EVENT_HEADER = "X-Kiln-Event"
DELIVERY_HEADER = "X-Kiln-Delivery"
EVENT = "build.finished"
#: deliveries one sweep sends, and how many at once
BATCH = 32
PARALLEL = 8
#: bytes of a receiver's answer read (and kept in last_error when it is not 2xx)
RESPONSE_BYTES = 4096


def sign_body(secret: str, body: bytes) -> str:
    """Return the X-Kiln-Signature value of a body: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_body(secret: str, body: bytes, header: str | None) -> bool:
    """Tell whether an X-Kiln-Signature header is the body's signature (constant time)."""
    return header is not None and hmac.compare_digest(sign_body(secret, body), header)


def payload(snapshot: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Return the JSON document POSTed for a finished build."""
    key = snapshot["key"]
    base = f"{base_url.rstrip('/')}/api/builds/{key}"
    filename = None
    with contextlib.suppress(SpecError):
        filename = BuildSpec.from_dict(snapshot.get("spec") or {}).filename
    doc: dict[str, Any] = {
        "event": EVENT,
        "key": key,
        "state": snapshot["state"],
        "error": snapshot.get("error"),
        "sha256": snapshot.get("sha256"),
        "size": snapshot.get("size"),
        "filename": filename if snapshot["state"] == "succeeded" else None,
        "finished_at": snapshot.get("finished_at"),
        "links": {"self": base},
    }
    if snapshot["state"] == "succeeded":
        doc["links"].update({
            "artifact": f"{base}/artifact",
            "signature": f"{base}/artifact.sig",
            "checksum": f"{base}/artifact.sha256",
            "provenance": f"{base}/provenance",
            "sbom": f"{base}/sbom",
        })
    return doc


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str = ""
    #: a refusal that another attempt cannot change (the host became private)
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float,
         allow_private: bool, resolve: AddressResolver = socket.getaddrinfo) -> Outcome:
    """POST ``body`` to ``url`` through an address checked just before; never follow redirects."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    host = parts.hostname or ""
    try:
        addresses = resolve_host(host, port, allow_private=allow_private, resolve=resolve)
    except CallbackRefused as exc:
        return Outcome(None, str(exc), permanent="does not resolve" not in str(exc))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    error = ""
    for address in addresses:
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)

        # connect to the address that was checked; Host and TLS SNI keep the name
        def pinned(_addr: object, timeout: float | None = timeout, source: Any = None,
                   _ip: str = address) -> socket.socket:
            return socket.create_connection((_ip, port), timeout, source)

        conn._create_connection = pinned  # type: ignore[attr-defined]
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read(RESPONSE_BYTES)
            if 200 <= resp.status < 300:
                return Outcome(resp.status)
            text = answer.decode("utf-8", "replace").strip()
            return Outcome(resp.status, f"HTTP {resp.status}: {text[:500]}")
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
    return Outcome(None, error)


class Deliverer:
    """Send pending deliveries; one ``run_once`` is one sweep (the janitor's job)."""

    def __init__(
        self,
        *,
        manager: WebhookManager,
        allow_private: bool,
        timeout: float = 10.0,
        max_attempts: int = 8,
        retry_base_seconds: float = 10.0,
        max_retry_seconds: float = 3600.0,
        rand: Callable[[], float] = random.random,
        resolve: AddressResolver = socket.getaddrinfo,
    ) -> None:
        self.manager = manager
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.max_retry_seconds = max_retry_seconds
        self.rand = rand
        self.resolve = resolve

    def backoff(self, attempt: int) -> float:
        """Return seconds before the next attempt: exponential with ±50% jitter, capped."""
        delay = self.retry_base_seconds * (2 ** max(attempt - 1, 0)) * (0.5 + self.rand())
        return min(delay, self.max_retry_seconds)

    def body(self, row: dict[str, Any]) -> bytes:
        """Return the bytes POSTed for one delivery (the same on every attempt)."""
        doc = payload(row["payload"], row["base_url"])
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def headers(self, row: dict[str, Any], body: bytes) -> dict[str, str]:
        """Return the request headers of one delivery."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"Kiln-Webhook/{kiln_version()}",
            EVENT_HEADER: EVENT,
            DELIVERY_HEADER: str(row["id"]),
        }
        # subscriptions made before secrets were per subscription have none: no requester
        # holds a secret that could check them
        if row.get("secret"):
            headers[SIGNATURE_HEADER] = sign_body(row["secret"], body)
        return headers

    def deliver(self, row: dict[str, Any]) -> Outcome:
        """Send one delivery and record its outcome."""
        body = self.body(row)
        outcome = post(row["url"], body, self.headers(row, body), timeout=self.timeout,
                       allow_private=self.allow_private, resolve=self.resolve)
        if outcome.ok:
            assert outcome.status is not None
            self.manager.delivered(row["id"], status=outcome.status)
            log.info("webhook %s for build %s delivered (%s)", row["id"], row["build_key"],
                     outcome.status, extra={"build_key": row["build_key"]})
            return outcome
        final = outcome.permanent or row["attempts"] >= self.max_attempts
        delay = 0.0 if final else self.backoff(row["attempts"])
        self.manager.retry(row["id"], status=outcome.status, error=outcome.error, delay=delay,
                           final=final)
        log.warning("webhook %s for build %s: attempt %d failed (%s)%s", row["id"],
                    row["build_key"], row["attempts"], outcome.error,
                    "; giving up" if final else f"; retrying in {delay:.0f}s",
                    extra={"build_key": row["build_key"]})
        return outcome

    def run_once(self) -> dict[str, int]:
        """Queue deliveries for finished builds, then send the due ones (in parallel)."""
        fired = self.manager.fire()
        # a claim holds a delivery a little longer than one attempt can take
        rows = self.manager.claim(limit=BATCH, lease_seconds=self.timeout * 2 + 30)
        if not rows:
            return {"fired": fired} if fired else {}
        with ThreadPoolExecutor(min(PARALLEL, len(rows)),
                                thread_name_prefix="kiln-webhook") as pool:
            outcomes = list(pool.map(self._safe_deliver, rows))
        sent = sum(1 for o in outcomes if o is not None and o.ok)
        return {"fired": fired, "delivered": sent, "failed": len(rows) - sent}

    def _safe_deliver(self, row: dict[str, Any]) -> Outcome | None:
        try:
            return self.deliver(row)
        except Exception:  # one bad row must not stop the others; its lease lapses
            log.exception("webhook %s could not be processed", row.get("id"))
            return None
