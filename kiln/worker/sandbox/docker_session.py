"""The docker sandbox's sessions: one container per phase, steps run with exec."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

from docker import DockerClient
from docker.errors import ImageNotFound

from kiln.worker.sandbox.base import OutputCallback, SandboxError, Step, StepResult
from kiln.worker.sandbox.docker_engine import (
    _ENGINE_ERRORS,
    IDLE_COMMAND,
    WORK_PATH,
    _crowded_out,
    _Lines,
    _remove,
)


class SessionHost(Protocol):
    """What a session uses of the DockerSandbox that opened it (kiln/worker/sandbox/docker.py)."""

    client: DockerClient
    image: str
    image_id: str
    user: str

    def run(self, step: Step, *, workdir: Path, on_output: OutputCallback | None = None,
            cancel: threading.Event | None = None) -> StepResult: ...

    def _options(self, step: Step, workdir: Path,
                 private_cache: Path | None) -> dict[str, Any]: ...

    def _proxy_urls(self, step: Step) -> list[str]: ...

    def _give_tree(self, root: Path) -> None: ...

    def _watch(self, container: Any, deadline: float, cancel: threading.Event | None,
               done: threading.Event, killed: list[str], crowded: list[bool]) -> None: ...


class DockerSession:
    """The steps of one phase, run with ``exec`` in one container of the sandbox image.

    A container start costs 0.3-0.5 s; the fetch phase runs three to five steps (bench/).
    The container is made as ``DockerSandbox.run`` makes a fetch step's (mounts, network,
    limits, labels, user), is started at the first step, idles between steps, and each step
    gets the image's environment plus its own ``Step.env``. A step past its timeout, a
    cancel, or the pids limit kills the whole container (the next step, if any, gets a new
    one). A step this container does not suit (another network or proxy) runs in its own
    container through ``run``.
    """

    def __init__(self, sandbox: SessionHost, name: str, *, workdir: Path, network: bool,
                 build_key: str, timeout: float) -> None:
        self.sandbox = sandbox
        self.name = name
        self.workdir = workdir.resolve()
        self.network = network
        self.build_key = build_key
        self.ends = time.monotonic() + timeout
        self.container: Any = None
        #: the proxies whose directories the container mounts
        self.proxies: tuple[str, ...] = ()

    def run(
        self,
        step: Step,
        *,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run ``step`` in the session's container; never raise for a step failure."""
        started = time.monotonic()
        if cancel is not None and cancel.is_set():
            return StepResult(exit_code=-1, output="", duration=0.0, killed="cancelled")
        proxies = tuple(self.sandbox._proxy_urls(step))
        if not (self.network and step.network) or (
                self.container is not None and proxies != self.proxies):
            # compile steps keep their own hardened container (and private build cache)
            return self.sandbox.run(step, workdir=self.workdir, on_output=on_output,
                                    cancel=cancel)
        try:
            if self.container is None:
                self._start(step, proxies)
            return self._exec(step, started, on_output, cancel)
        except _ENGINE_ERRORS as exc:
            self.close()
            raise SandboxError(f"the engine failed during the {step.name} step: {exc}") from exc

    def close(self) -> None:
        """Remove the container, if there is one."""
        container, self.container = self.container, None
        if container is not None:
            _remove(container)

    def _start(self, step: Step, proxies: tuple[str, ...]) -> None:
        sandbox = self.sandbox
        if not self.workdir.is_dir():
            raise SandboxError(f"work directory {self.workdir} does not exist")
        try:
            sandbox._give_tree(self.workdir)
        except OSError as exc:
            raise SandboxError(
                f"cannot prepare the directories of the {self.name} step: {exc}"
            ) from exc
        # the container's configuration is a fetch step's lasting the rest of the session
        idle = Step(self.name, IDLE_COMMAND, env=dict(step.env), network=True,
                    timeout=max(0.0, self.ends - time.monotonic()), build_key=self.build_key)
        options = sandbox._options(idle, self.workdir, None)
        # each exec gets the step's own variables: the container itself gets none
        options["environment"] = {}
        try:
            container = sandbox.client.containers.create(**options)
        except ImageNotFound as exc:
            raise SandboxError(
                f"sandbox image {sandbox.image} ({sandbox.image_id}) is gone") from exc
        except _ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot create the {self.name} container: {exc}") from exc
        self.container = container
        self.proxies = proxies
        container.start()

    def _exec(self, step: Step, started: float, on_output: OutputCallback | None,
              cancel: threading.Event | None) -> StepResult:
        container = self.container
        api = self.sandbox.client.api
        exec_id = api.exec_create(
            container.id, list(step.argv), stdout=True, stderr=True, stdin=False, tty=False,
            environment=dict(step.env), workdir=WORK_PATH, user=self.sandbox.user,
        )["Id"]
        killed: list[str] = []
        crowded: list[bool] = []
        done = threading.Event()
        lines = _Lines(on_output)
        watcher = threading.Thread(
            target=self.sandbox._watch,
            args=(container, started + step.timeout, cancel, done, killed, crowded),
            name=f"kiln-watch-{container.short_id}", daemon=True,
        )
        try:
            output = api.exec_start(exec_id, stream=True, demux=False)
            watcher.start()
            lines.read(output)
            inspected = api.exec_inspect(exec_id)
        finally:
            done.set()
            if watcher.is_alive():
                watcher.join(timeout=5)
        code = inspected.get("ExitCode")
        reason = killed[0] if killed else None
        if reason is None and code != 0:
            container.reload()
            state = container.attrs.get("State", {})
            if state.get("OOMKilled"):
                reason = "oom"
            elif _crowded_out(crowded, lines.text()):
                reason = "pids"
            if reason is not None or not state.get("Running"):
                self.close()  # the next step needs a fresh container
        if reason is not None:
            self.close()
        return StepResult(
            exit_code=int(code) if code is not None else -1,
            output=lines.text(),
            duration=time.monotonic() - started,
            timed_out=reason == "timeout",
            killed=reason,
        )
