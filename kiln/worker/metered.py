"""A sandbox wrapper that records each step's duration."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.metrics import STEP_BUCKETS, MetricsRecorder
from kiln.worker.sandbox.base import OutputCallback, Sandbox, Step, StepResult


class _MeteredSession:
    """A sandbox session whose steps are recorded."""

    def __init__(self, sandbox: MeteredSandbox, inner: Any) -> None:
        self.sandbox = sandbox
        self.inner = inner

    def run(self, step: Step, *, on_output: OutputCallback | None = None,
            cancel: threading.Event | None = None) -> StepResult:
        """Run the step in the wrapped session and record it."""
        return self.sandbox.observe(step, lambda: self.inner.run(step, on_output=on_output,
                                                                 cancel=cancel))


class MeteredSandbox:
    """A sandbox that records each step's duration and result; otherwise the one it wraps."""

    def __init__(self, inner: Sandbox, recorder: MetricsRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.identity = inner.identity

    def go_version(self) -> str:
        """Return the wrapped sandbox's Go version."""
        return self.inner.go_version()

    def cleanup_orphans(self) -> int:
        """Clean up what the wrapped sandbox left behind."""
        return self.inner.cleanup_orphans()

    def run(self, step: Step, *, workdir: Path, on_output: OutputCallback | None = None,
            cancel: threading.Event | None = None) -> StepResult:
        """Run the step in the wrapped sandbox and record how long it took and how it ended."""
        return self.observe(step, lambda: self.inner.run(step, workdir=workdir,
                                                         on_output=on_output, cancel=cancel))

    @contextlib.contextmanager
    def session(self, name: str, **kwargs: Any) -> Iterator[_MeteredSession]:
        """Open the wrapped sandbox's session; its steps are recorded like run()'s."""
        with self.inner.session(name, **kwargs) as inner:
            yield _MeteredSession(self, inner)

    def observe(self, step: Step, call: Callable[[], StepResult]) -> StepResult:
        """Run ``call`` (one step) and record its duration and how it ended."""
        started = time.monotonic()
        result = "error"
        try:
            outcome = call()
            result = outcome.killed or ("ok" if outcome.ok else "failed")
            return outcome
        finally:
            self.recorder.observe("kiln_build_step_duration_seconds",
                                  {"step": step.name, "result": result},
                                  time.monotonic() - started, STEP_BUCKETS)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
