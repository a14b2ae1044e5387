"""A fake cloud instance metadata server: AWS IMDSv2, GCE's metadata server, Azure Scheduled Events.

It speaks each protocol as a spot worker meets it (token, headers, status codes,
acknowledgement), answers a preemption notice once told to, and records what it was asked.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

VM_NAME = "kiln-spot-7"
EVENT_ID = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
AWS_ACTION = {"action": "terminate", "time": "2031-04-01T12:02:00Z"}


class MetadataState:
    """What the fake metadata server answers, and what it was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.preempted = False
        self.tokens: set[str] = set()
        self.acks: list[Any] = []
        self.requests: list[str] = []

    def reset(self) -> None:
        with self.lock:
            self.preempted = False
            self.acks.clear()
            self.requests.clear()


class MetadataHandler(BaseHTTPRequestHandler):
    """The three providers' instance metadata endpoints a spot worker uses."""

    server: MetadataServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        """Stay quiet."""

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> MetadataState:
        state = self.server.state
        with state.lock:
            state.requests.append(f"{self.command} {self.path}")
        return state

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        if self.path != "/latest/api/token":
            self._send(404)
            return
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            self._send(400, b"Missing or invalid ttl-seconds header")
            return
        token = os.urandom(16).hex()
        with state.lock:
            state.tokens.add(token)
        self._send(200, token.encode(), headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        url = urlsplit(self.path)
        if url.path.startswith("/latest/"):
            if self.headers.get("X-aws-ec2-metadata-token") not in state.tokens:
                self._send(401)  # IMDSv2 only: no session token, no answer
            elif url.path == "/latest/meta-data/spot/instance-action" and state.preempted:
                self._send(200, json.dumps(AWS_ACTION).encode(), "text/plain")
            else:
                self._send(404, b"Not Found")
        elif url.path.startswith("/impostor/"):
            self._send(200, b"TRUE")  # any web server, not a metadata server
        elif url.path.startswith("/computeMetadata/v1/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                self._send(403, b"Missing required header: Metadata-Flavor")
            elif url.path == "/computeMetadata/v1/instance/preempted":
                self._send(200, b"TRUE" if state.preempted else b"FALSE",
                           headers={"Metadata-Flavor": "Google"})
            else:
                self._send(404, headers={"Metadata-Flavor": "Google"})
        elif url.path.startswith("/metadata/"):
            if self.headers.get("Metadata") != "true":
                self._send(400, b'{"error":"Bad request. Required metadata header not specified"}',
                           "application/json")
            elif url.path == "/metadata/instance/compute/name":
                self._send(200, VM_NAME.encode())
            elif url.path == "/metadata/scheduledevents" and "api-version=" in url.query:
                self._send(200, json.dumps(self._azure_events(state)).encode(),
                           "application/json")
            else:
                self._send(404)
        else:
            self._send(404)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        state = self._record()
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path != "/metadata/scheduledevents" or self.headers.get("Metadata") != "true":
            self._send(400)
            return
        with state.lock:
            state.acks.append(json.loads(body))
        self._send(200)

    @staticmethod
    def _azure_events(state: MetadataState) -> dict[str, Any]:
        # a neighbour's eviction is always listed; ours once preempted
        events = [_azure_event("0F2B3C4D-0000-4000-8000-000000000001", "other-vm")]
        if state.preempted:
            events.append(_azure_event(EVENT_ID, VM_NAME))
        return {"DocumentIncarnation": 2 if state.preempted else 1, "Events": events}


def _azure_event(event_id: str, vm: str) -> dict[str, Any]:
    return {"EventId": event_id, "EventStatus": "Scheduled", "EventType": "Preempt",
            "ResourceType": "VirtualMachine", "Resources": [vm],
            "NotBefore": "Mon, 01 Apr 2031 12:00:30 GMT", "Description": "",
            "EventSource": "Platform", "DurationInSeconds": -1}


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True
    state: MetadataState


@contextmanager
def serving() -> Iterator[tuple[str, MetadataState]]:
    """Run a metadata server on 127.0.0.1; yield its base URL and state."""
    server = MetadataServer(("127.0.0.1", 0), MetadataHandler)
    server.state = MetadataState()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.state
    finally:
        server.shutdown()
        server.server_close()
