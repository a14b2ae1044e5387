"""The sandbox interface: run one build step in isolation."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kiln.errors import KilnError

#: Label (Docker) / environment marker every sandbox puts on what it starts.
SANDBOX_LABEL = "dev.kiln.sandbox"

#: Step names the builder uses; sandboxes choose network access by step.
FETCH = "fetch"
COMPILE = "compile"

#: longest line of a step's output passed on (UTF-8 bytes); the rest of it is cut at read
#: time, and the cut said: a step may print megabytes without a newline
MAX_LINE_BYTES = 4 * 1024
#: output kept per step; older lines are dropped from the result (not from the callback)
MAX_OUTPUT_CHARS = 256 * 1024


@dataclass(frozen=True)
class CacheProg:
    """The fleet build cache as a compile step reaches it (kiln/buildcache/).

    ``program`` is the GOCACHEPROG program on the worker's machine (the docker sandbox
    runs its image's own), ``socket`` the build's Unix socket on the worker, ``outputs``
    the directory of cached outputs, which a step may read but never write.
    """

    program: Path
    socket: Path
    outputs: Path


@dataclass(frozen=True)
class Step:
    """One command to run inside a sandbox.

    ``env`` holds only the Go variables the step needs (GOOS, GOARCH, GOPROXY, ...);
    the sandbox adds its own HOME, PATH, GOROOT, GOMODCACHE and GOCACHE. Nothing of the
    calling process's environment is ever passed through.
    """

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    network: bool = False
    timeout: float = 600.0
    build_key: str = ""
    #: set on a compile step when the fleet build cache is on
    cacheprog: CacheProg | None = None


@dataclass(frozen=True)
class StepResult:
    """What a step did: exit code, combined output, and why it was stopped if it was."""

    exit_code: int
    output: str
    duration: float
    timed_out: bool = False
    #: set when the sandbox killed the step: "timeout", "oom", "cancelled", "pids"
    killed: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None


class SandboxError(KilnError):
    """The sandbox itself failed (engine unreachable, image missing): an infrastructure fault."""


OutputCallback = Callable[[str], None]


class StepOutput:
    """A step's output: split into lines as it arrives, each cut at MAX_LINE_BYTES, passed on
    line by line, the last MAX_OUTPUT_CHARS kept.

    Each byte is looked at once and at most MAX_LINE_BYTES of a line are held, however long
    the line runs.
    """

    def __init__(self, on_output: OutputCallback | None) -> None:
        self.on_output = on_output
        self.lines: deque[str] = deque()
        self.size = 0
        self._line = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the output; pass on every line they end."""
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._take(data, start, end)
            self._end_line()
            start = end + 1
        self._take(data, start, len(data))

    def close(self) -> None:
        """Pass on a last line that has no newline."""
        if self._line or self._cut:
            self._end_line()

    def _take(self, data: bytes, start: int, end: int) -> None:
        keep = max(min(end - start, MAX_LINE_BYTES - len(self._line)), 0)
        self._line += data[start:start + keep]
        self._cut += end - start - keep

    def _end_line(self) -> None:
        raw = bytes(self._line)
        if self._cut:
            whole = _whole_characters(raw)
            cut = self._cut + len(raw) - len(whole)
            line = f"{whole.decode('utf-8', 'replace')}… ({cut} bytes cut)"
        else:
            line = raw.decode("utf-8", "replace")
        self._line.clear()
        self._cut = 0
        self.emit(line)

    def emit(self, line: str) -> None:
        """Pass ``line`` on and keep it."""
        if self.on_output is not None:
            self.on_output(line)
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > MAX_OUTPUT_CHARS and len(self.lines) > 1:
            self.size -= len(self.lines.popleft()) + 1

    def text(self) -> str:
        """Return the kept output."""
        return "\n".join(self.lines)


def _whole_characters(data: bytes) -> bytes:
    """Drop a UTF-8 character cut in two at the end of ``data``."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the first byte of the last character
            length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if length <= back else data[:-back]
    return data


class Session(Protocol):
    """Where several steps of one phase run, one after the other, in one place."""

    def run(
        self,
        step: Step,
        *,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run ``step`` in the session's working directory; never raise for a step failure."""
        ...


class Sandbox(Protocol):
    """Runs build steps in isolation. Implementations: ``process`` and ``docker``."""

    #: what identifies the environment a binary was built in; part of the build key
    identity: str

    def go_version(self) -> str:
        """Return the Go toolchain version the steps run with, e.g. ``go1.25.1``."""
        ...

    def run(
        self,
        step: Step,
        *,
        workdir: Path,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run ``step`` with ``workdir`` as its working directory; never raise for a step failure."""
        ...

    def session(
        self, name: str, *, workdir: Path, network: bool, build_key: str, timeout: float
    ) -> AbstractContextManager[Session]:
        """Open a place where the steps of phase ``name`` run; close it on leaving.

        ``network``, ``build_key`` and ``timeout`` (all its steps together) describe the
        steps to come, whose own ``Step`` fields still rule each one.
        """
        ...

    def cleanup_orphans(self) -> int:
        """Remove whatever a crashed predecessor left running; return how many."""
        ...


class EachStep:
    """A session that runs each step as its sandbox's ``run`` does: on its own."""

    def __init__(self, sandbox: Sandbox, workdir: Path) -> None:
        self.sandbox = sandbox
        self.workdir = workdir

    def run(
        self,
        step: Step,
        *,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run ``step`` through the sandbox's ``run``."""
        return self.sandbox.run(step, workdir=self.workdir, on_output=on_output, cancel=cancel)
