"""The client side of the ``kiln`` command: build, watch, fetch and list through a server.

``kiln build``, ``status``, ``logs``, ``download`` and ``list`` talk to a Kiln server named by
``--server`` or ``KILN_SERVER`` (API key: ``--api-key`` or ``KILN_API_KEY``). Exit codes:
0 built (or done), 1 the build failed, 2 usage (including a request the server refused),
3 the server cannot be reached or cannot serve.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import requests

from kiln.errors import KilnError

DEFAULT_SERVER = "http://127.0.0.1:8234"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
#: seconds to wait for a server's answer (live streams send a keep-alive every 15 s)
TIMEOUT = 30.0
STREAM_READ_TIMEOUT = 90.0
#: how long a lost event stream is retried before the server counts as unreachable
RECONNECT_SECONDS = 60.0
#: log lines shown under the progress line on a terminal
TAIL_LINES = 6
#: least seconds between two redraws of the progress display
REDRAW_SECONDS = 0.1
FINAL_STATES = ("succeeded", "failed", "cancelled")

_GOOS = {"linux": "linux", "darwin": "darwin", "win32": "windows", "cygwin": "windows"}
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "i386": "386", "i686": "386", "riscv64": "riscv64", "ppc64le": "ppc64le",
           "s390x": "s390x"}


class ClientError(KilnError):
    """A command cannot go on; ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event."""

    id: str
    event: str
    data: Any


def host_platform() -> tuple[str, str, str | None]:
    """Return this machine's (GOOS, GOARCH, GOARM) as best known."""
    goos = next((v for k, v in _GOOS.items() if sys.platform.startswith(k)), sys.platform)
    machine = platform.machine().lower()
    if machine.startswith("armv"):
        return goos, "arm", machine[4] if machine[4:5].isdigit() else None
    return goos, _GOARCH.get(machine, machine), None


def parse_events(chunks: Iterator[bytes]) -> Iterator[Event]:
    """Parse a text/event-stream body (comments skipped, multi-line data joined)."""
    buffer = b""
    fields: dict[str, list[str]] = {}
    for chunk in chunks:
        buffer += chunk
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            line, buffer = buffer[:cut].rstrip(b"\r").decode("utf-8", "replace"), buffer[cut + 1:]
            if not line:
                if "data" in fields:
                    event = fields.get("event", ["message"])[-1]
                    data = "\n".join(fields["data"])
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        payload = data
                    yield Event(fields.get("id", [""])[-1], event, payload)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


class KilnClient:
    """Kiln's HTTP API, for the command line."""

    def __init__(self, server: str, *, api_key: str = "",
                 session: requests.Session | None = None) -> None:
        self.server = server.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "kiln-cli"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        try:
            resp = self.session.request(method, self.server + path, **kwargs)
        except requests.RequestException as exc:
            raise ClientError(EXIT_UNREACHABLE,
                              f"cannot reach Kiln at {self.server}: {_reason(exc)}") from None
        if resp.status_code >= 400:
            raise _http_error(resp, self.server)
        return resp

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ask for a build; return its document."""
        return dict(self.request("POST", "/api/builds", json=body).json())

    def status(self, key: str) -> dict[str, Any]:
        """Return a build's document."""
        return dict(self.request("GET", f"/api/builds/{key}").json())

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """Return the most recent builds."""
        return list(self.request("GET", "/api/builds", params={"limit": limit}).json()["builds"])

    def log_text(self, key: str) -> Iterator[bytes]:
        """Yield the stored log (UTF-8 text) in chunks."""
        resp = self.request("GET", f"/api/builds/{key}/log", stream=True)
        with resp:
            yield from resp.iter_content(chunk_size=None)

    def events(self, key: str, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[Event]:
        """Yield a build's live events until the result, resuming after lost connections."""
        last = ""
        lost_since: float | None = None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                resp = self.request("GET", f"/api/builds/{key}/events", headers=headers,
                                     stream=True, timeout=(TIMEOUT, STREAM_READ_TIMEOUT))
                with resp:
                    if resp.status_code == 204:  # the result was already delivered
                        return
                    lost_since = None
                    for event in parse_events(resp.iter_content(chunk_size=None)):
                        last = event.id or last
                        yield event
                        if event.event == "result":
                            return
            except (requests.RequestException, ClientError) as exc:
                if isinstance(exc, ClientError) and exc.code != EXIT_UNREACHABLE:
                    raise
                now = clock()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since > RECONNECT_SECONDS:
                    raise ClientError(EXIT_UNREACHABLE, f"lost Kiln at {self.server}: "
                                      f"{exc.message if isinstance(exc, ClientError) else _reason(exc)}"
                                      ) from None
            sleep(1.0)  # the stream ended early, or the connection dropped: resume

    def download(self, key: str, dest: Path, *, sha256: str) -> Path:
        """Download a build's artifact to ``dest``, check its sha256, make it executable."""
        resp = self.request("GET", f"/api/builds/{key}/artifact", stream=True,
                             timeout=(TIMEOUT, 300))
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with resp, os.fdopen(fd, "wb") as out:
                for chunk in resp.iter_content(chunk_size=256 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256:
                raise ClientError(EXIT_FAILED, f"the download's sha256 is {digest.hexdigest()}, "
                                  f"not {sha256}: try again")
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
        except requests.RequestException as exc:
            raise ClientError(EXIT_UNREACHABLE, f"the download broke off: {_reason(exc)}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Failed to establish a new connection: ", "Caused by "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip("()'\" ") or type(exc).__name__


def _http_error(resp: requests.Response, server: str) -> ClientError:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text.strip()[:300] or resp.reason
    if resp.status_code in (401, 403):
        message += " (set KILN_API_KEY or pass --api-key)"
    code = EXIT_UNREACHABLE if resp.status_code >= 500 else EXIT_USAGE
    return ClientError(code, f"{server} answered {resp.status_code}: {message}")


# --- progress -------------------------------------------------------------------------


def describe_state(data: dict[str, Any]) -> str:
    """Return a state event in words."""
    state = data.get("state", "")
    if state == "queued":
        if data.get("attempt"):
            return f"queued for attempt {data['attempt'] + 1} of {data.get('max_attempts')}"
        ahead = data.get("queue_position") or 0
        return f"queued, {ahead} ahead" if ahead else "queued, next in line"
    if state == "running":
        attempt = data.get("attempt") or 1
        return "building" + (f" (attempt {attempt})" if attempt > 1 else "")
    return str(state)


def human_size(size: int | None) -> str:
    """Return a byte count in KB/MB."""
    value = float(size or 0)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


class Progress:
    """Show a build's events: a live status and log tail on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, tail: int = TAIL_LINES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.status = "connecting"
        self.step = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self._drawn = 0
        self._last_draw = 0.0
        #: events arrived since the last redraw (skipped as too soon after it)
        self._pending = False

    def handle(self, event: Event) -> None:
        """Show one event."""
        data = event.data if isinstance(event.data, dict) else {}
        if event.event == "state":
            self.status = describe_state(data)
            self._plain(f"state: {self.status}")
        elif event.event == "step":
            self.step = str(data.get("step", ""))
            self._plain(f"step: {self.step}")
        elif event.event == "log":
            line = str(data.get("line", ""))
            self.tail.append(line)
            self._plain(f"  {line}")
        self._draw()

    def _plain(self, text: str) -> None:
        if not self.tty:
            print(text, file=self.out, flush=True)

    def _draw(self, *, force: bool = False) -> None:
        if not self.tty:
            return
        now = self.clock()
        if not force and now - self._last_draw < REDRAW_SECONDS:
            self._pending = True
            return
        self._last_draw = now
        self._pending = False
        width = max(shutil.get_terminal_size((100, 24)).columns - 1, 20)
        status = f"{self.status}" + (f" · {self.step}" if self.step else "")
        lines = [f"\x1b[1m{status}\x1b[0m  {now - self.started:.0f}s"[: width + 8]]
        lines += [f"\x1b[2m  {line[: width - 2]}\x1b[0m" for line in self.tail]
        self._clear()
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = len(lines)

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def finish(self, text: str) -> None:
        """Replace the live display with a final message."""
        if self._pending:  # the last burst of events was never shown
            self._draw(force=True)
        self._clear()
        print(text, file=self.out, flush=True)


# --- commands ---------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> KilnClient:
    return KilnClient(args.server, api_key=args.api_key)


def follow(client: KilnClient, key: str, progress: Progress) -> dict[str, Any]:
    """Show a build's events until its result; return the final build document."""
    for event in client.events(key):
        if event.event == "result" and isinstance(event.data, dict):
            return event.data
        progress.handle(event)
    return client.status(key)  # the result was shown earlier (a resumed stream): ask


def _report(doc: dict[str, Any], progress: Progress) -> int:
    if doc.get("state") == "succeeded":
        artifact = doc.get("artifact") or {}
        progress.finish(f"built {artifact.get('filename', '')} ({human_size(artifact.get('size'))}), "
                        f"sha256 {artifact.get('sha256', '')}")
        return EXIT_OK
    progress.finish(f"kiln: build {doc.get('key', '')} {doc.get('state')}:\n"
                    f"{doc.get('error') or '(no error message)'}")
    return EXIT_FAILED


def cmd_build(args: argparse.Namespace) -> int:
    """Ask for a build; with --wait or -o, watch it and fetch the binary."""
    goos, goarch, goarm = host_platform()
    body: dict[str, Any] = {"os": args.os or goos, "arch": args.arch or goarch,
                            "plugins": args.plugin, "replacements": args.replace}
    arm = args.arm or (goarm if not args.arch and body["arch"] == "arm" else None)
    if arm:
        body["arm"] = arm
    if args.caddy:
        body["caddy_version"] = args.caddy
    client = _client(args)
    doc = client.submit(body)
    key = doc["key"]
    print(key, flush=True)
    if not (args.wait or args.output):
        print(f"{doc['state']}: follow it with `kiln logs -f {key}` or "
              f"{client.server}/builds/{key}", file=sys.stderr)
        return EXIT_OK
    progress = Progress(sys.stderr)
    if doc["state"] not in FINAL_STATES:
        doc = follow(client, key, progress)
    code = _report(doc, progress)
    if code == EXIT_OK and args.output:
        dest = Path(args.output)
        if dest.is_dir():
            dest = dest / doc["artifact"]["filename"]
        client.download(key, dest, sha256=doc["artifact"]["sha256"])
        print(f"{doc['artifact']['sha256']}  {dest}", flush=True)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    """Show a build's state, versions, checksum or error."""
    doc = _client(args).status(args.key)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        rows = [("key", doc["key"]), ("state", doc["state"]),
                ("platform", "/".join(filter(None, [doc["os"], doc["arch"],
                                                    f"v{doc['arm']}" if doc.get("arm") else ""]))),
                ("caddy", doc["caddy_version"])]
        rows += [("plugin", f"{p['package']} {p['version']}") for p in doc.get("plugins", [])]
        if doc.get("queue_position") is not None:
            rows.append(("queue", f"{doc['queue_position']} ahead"))
        rows.append(("attempts", f"{doc.get('attempts')} of {doc.get('max_attempts')}"))
        if doc.get("artifact"):
            a = doc["artifact"]
            rows += [("artifact", f"{a['filename']} ({human_size(a['size'])})"),
                     ("sha256", a["sha256"])]
        for name, value in rows:
            print(f"{name:<10} {value}")
        if doc.get("error"):
            print(f"error\n{doc['error']}")
    return EXIT_FAILED if doc["state"] in ("failed", "cancelled") else EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """Print a build's log; with -f, follow it live until the build ends."""
    client = _client(args)
    if not args.follow:
        sys.stdout.flush()
        for chunk in client.log_text(args.key):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return EXIT_OK
    doc: dict[str, Any] = {}
    for event in client.events(args.key):
        data = event.data if isinstance(event.data, dict) else {}
        if event.event == "step":
            print(f"==> {data.get('step')}", flush=True)
        elif event.event == "log":
            print(data.get("line", ""), flush=True)
        elif event.event == "state":
            print(f"--- {describe_state(data)}", file=sys.stderr, flush=True)
        elif event.event == "result":
            doc = data
    doc = doc or client.status(args.key)
    if doc.get("state") == "succeeded":
        return EXIT_OK
    print(f"kiln: build {args.key} {doc.get('state')}:\n{doc.get('error') or ''}",
          file=sys.stderr)
    return EXIT_FAILED


def cmd_download(args: argparse.Namespace) -> int:
    """Download a build's binary (checked against its sha256)."""
    client = _client(args)
    doc = client.status(args.key)
    if doc["state"] != "succeeded" or not doc.get("artifact"):
        print(f"kiln: build {args.key} is {doc['state']}; there is nothing to download"
              + (f":\n{doc['error']}" if doc.get("error") else ""), file=sys.stderr)
        return EXIT_FAILED
    dest = Path(args.output) if args.output else Path(doc["artifact"]["filename"])
    if dest.is_dir():
        dest = dest / doc["artifact"]["filename"]
    client.download(args.key, dest, sha256=doc["artifact"]["sha256"])
    print(f"{doc['artifact']['sha256']}  {dest}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """List the most recent builds."""
    builds = _client(args).recent(args.limit)
    if args.json:
        print(json.dumps(builds, indent=2))
        return EXIT_OK
    print(f"{'KEY':<12}  {'STATE':<9}  {'PLATFORM':<16}  {'CADDY':<10}  PLUGINS")
    for b in builds:
        plat = "/".join(filter(None, [b["os"], b["arch"], f"v{b['arm']}" if b.get("arm") else ""]))
        print(f"{b['key'][:12]:<12}  {b['state']:<9}  {plat:<16}  {b['caddy_version']:<10}  "
              + (", ".join(b["plugins"]) or "-"))
    return EXIT_OK


def handle_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: a ClientError becomes its message and exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ClientError as exc:
            print(f"kiln: {exc.message}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            print("kiln: interrupted (the build goes on on the server)", file=sys.stderr)
            return 130

    run.__doc__ = handler.__doc__
    return run


def common_options(p: argparse.ArgumentParser) -> None:
    """Add the options every client command takes: --server and --api-key."""
    p.add_argument("--server", default=os.environ.get("KILN_SERVER") or DEFAULT_SERVER,
                   help="Kiln's URL (default: $KILN_SERVER or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY", ""),
                   help="API key sent as a bearer token (default: $KILN_API_KEY)")


def add_commands(sub: Any) -> None:
    """Add the client commands to the ``kiln`` command's subparsers."""
    goos, goarch, _ = host_platform()
    p = sub.add_parser("build", help="ask a Kiln server for a Caddy build",
                       description="Ask for Caddy with plugins; with --wait or -o, watch the "
                       "build and download the binary. Exit: 0 built, 1 failed, 2 usage, "
                       "3 server unreachable.")
    common_options(p)
    p.add_argument("--os", default="", help=f"GOOS (default: this machine's, {goos})")
    p.add_argument("--arch", default="", help=f"GOARCH (default: this machine's, {goarch})")
    p.add_argument("--arm", default=None, choices=["5", "6", "7"], help="GOARM for arch arm")
    p.add_argument("--caddy", default="", metavar="VERSION",
                   help="Caddy version: v2.8.4, a prefix, a branch or commit (default: latest)")
    p.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE[@VERSION]",
                   help="a plugin to include (repeatable)")
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW[@VERSION]",
                   help="a go.mod replacement (repeatable)")
    p.add_argument("--wait", action="store_true", help="watch the build until it ends")
    p.add_argument("-o", "--output", default="", metavar="FILE",
                   help="download the binary here when built (implies --wait)")
    p.set_defaults(func=handle_errors(cmd_build))

    p = sub.add_parser("status", help="show a build's state")
    common_options(p)
    p.add_argument("key")
    p.add_argument("--json", action="store_true", help="print the build document as JSON")
    p.set_defaults(func=handle_errors(cmd_status))

    p = sub.add_parser("logs", help="print a build's log")
    common_options(p)
    p.add_argument("key")
    p.add_argument("-f", "--follow", action="store_true", help="follow the build live")
    p.set_defaults(func=handle_errors(cmd_logs))

    p = sub.add_parser("download", help="download a build's binary")
    common_options(p)
    p.add_argument("key")
    p.add_argument("-o", "--output", default="", metavar="FILE",
                   help="where to write it (default: the server's file name)")
    p.set_defaults(func=handle_errors(cmd_download))

    p = sub.add_parser("list", help="list recent builds")
    common_options(p)
    p.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=handle_errors(cmd_list))
