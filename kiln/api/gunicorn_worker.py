"""gunicorn's gthread worker, answering the requests gunicorn refuses itself in Kiln's JSON.

gunicorn turns some requests away before the app sees them (a request line over 4094
bytes: 414; too many or too large headers: 431; a malformed request: 400) with an HTML
page. ``ApiWorker`` keeps gunicorn's choice of status and its reason, and answers with
kiln/api/errors.py's JSON error instead, saying what to fix:
``gunicorn --worker-class kiln.api.gunicorn_worker.ApiWorker`` (``kiln serve`` and the API
image do).
"""

from __future__ import annotations

import html
import json
import re
import uuid
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from kiln.api.errors import error_body

#: what to fix, for the statuses gunicorn answers itself
HINTS = {
    414: "send a shorter URL (fewer or shorter query parameters)",
    431: "send fewer or smaller headers",
}
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([^\r\n]*)\r\n")
_MESSAGE = re.compile(rb"</h1>\s*(.*?)\s*</body>", re.S)


class _Captured:
    """A socket stand-in that keeps what gunicorn would have written to the client."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data


def json_error(page: bytes) -> bytes | None:
    """Return gunicorn's HTML error answer ``page`` as Kiln's JSON error answer."""
    status = _STATUS_LINE.match(page)
    if status is None:
        return None
    code, reason = int(status.group(1)), status.group(2).decode("latin-1")
    found = _MESSAGE.search(page)
    detail = html.unescape(found.group(1).decode("latin-1")) if found else ""
    message = f"{reason}: {detail}" if detail else reason
    if code in HINTS:
        message += f"; {HINTS[code]}"
    body = json.dumps(error_body(code, message, str(uuid.uuid4()))).encode()
    head = (f"HTTP/1.1 {code} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class ApiWorker(ThreadWorker):
    """The gthread worker, with gunicorn's own error answers in Kiln's JSON error shape."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Let gunicorn choose the status and log; send the client JSON, not HTML."""
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        answer = json_error(captured.data) if captured.data else None
        try:
            util.write_nonblock(client, answer or captured.data)
        except Exception:  # the client is gone: nothing to tell it
            self.log.debug("Failed to send error message.")
