"""The sandbox interface: run one build step in isolation."""

from __future__ import annotations

import threading
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
