"""The docker sandbox: build steps run in throwaway containers of the sandbox image.

A compile step gets its own container; the fetch steps of one build share one, started by
``session`` and given each step with ``exec`` (``DockerSession``). Every container
(``worker_image/sandbox.Dockerfile``) is labelled with the build key
(``dev.kiln.sandbox``) and the worker id (``dev.kiln.worker``) so that leftovers can be
found, and removed whatever happens. Both kinds of step run as the non-root sandbox user
with a read-only root filesystem, no capabilities, ``no-new-privileges``, memory (without
swap), pids and CPU limits, a tmpfs ``/tmp`` and HOME, and an environment made of the
image's variables plus ``Step.env`` only: nothing of the worker's environment. A step is
killed at its timeout ("timeout"), on cancellation ("cancelled"), and when it sits at its
pids limit ("pids"); the kernel's OOM killer acting inside it shows as "oom".

The two kinds of step differ in what they may reach:

* fetch (``Step.network`` true): the configured network (``bridge`` or ``host``), or none
  when every GOPROXY entry is a ``file://`` URL, whose directories are then bind-mounted
  read-only at the same path; the module cache read-write; a throwaway build cache.
* compile (``Step.network`` false): no network at all; the module cache read-only; the
  build cache read-write.

Trust model of the build cache. Go's build cache is content-addressed by action IDs
(hashes of a compile's inputs), and ``go build`` trusts whatever it finds under an ID.
A step that can write the shared cache can therefore plant a tampered object file under
the ID of a popular package (Caddy's core, say), and every later build that compiles the
same package links it. Go never runs a module's code while compiling (no build scripts,
cgo is off), so doing that needs a compiler exploit; ``cache_mode: shared`` accepts that
risk for speed. ``cache_mode: copy`` gives each compile step a private copy of the shared
cache instead and throws it away afterwards: a step can poison only its own copy. In copy
mode nothing writes the shared cache back, so warm it with trusted builds (run the
sandbox once in ``shared`` mode) or accept cold compiles. With the fleet build cache
(``Step.cacheprog``, kiln/buildcache/) neither is mounted: go asks the worker, which checks
what it is given, and reads the outputs from a read-only mount.

Bind mounts are resolved by the engine on its own host: a worker that runs in a
container and talks to the host's engine through ``/var/run/docker.sock`` must see the
work and cache directories at the same paths as the host does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from docker import DockerClient
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig, Mount
from docker.utils import parse_bytes

from kiln.worker.sandbox.base import SANDBOX_LABEL, OutputCallback, SandboxError, Step, StepResult
from kiln.worker.sandbox.docker_engine import (
    _CACHE_MODES,
    _ENGINE_ERRORS,
    _NETWORKS,
    _UNSAFE_NAME,
    BUILDCACHE_PATH,
    DEADLINE_LABEL,
    EXIT_WAIT_SECONDS,
    HOME_PATH,
    HOME_TMPFS_BYTES,
    HOST_LABEL,
    INSTANCE_LABEL,
    KILL_RETRY_SECONDS,
    MODCACHE_PATH,
    ORPHAN_GRACE_SECONDS,
    PID_LABEL,
    PIDS_CHECK_SECONDS,
    PIDS_NEAR_LIMIT,
    PIDS_STRIKES,
    PROBE_LOG,
    PROBE_TIMEOUT_SECONDS,
    STEP_LABEL,
    SUMDB_PATH,
    WATCH_SECONDS,
    WORK_PATH,
    WORKER_LABEL,
    _alive,
    _crowded_out,
    _Lines,
    _numeric_user,
    _process_space,
    _remove,
)
from kiln.worker.sandbox.docker_session import DockerSession

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: the fleet build cache in a compile container: the image's GOCACHEPROG program
#: (worker_image/cacheprog), the build's socket and the outputs, both read-only
CACHEPROG_PROGRAM = "/usr/local/bin/kiln-cacheprog"
CACHEPROG_SOCKET = "/cache/kiln-cacheprog.sock"
CACHEPROG_OUTPUTS = "/cache/kiln-outputs"


class DockerSandbox:
    """Run steps in throwaway containers of the sandbox image."""

    def __init__(
        self,
        *,
        client: DockerClient,
        image: str,
        cache_dir: Path,
        network: str,
        memory: str,
        pids_limit: int,
        cpus: float,
        cache_mode: str,
        user: str,
        worker_id: str = "",
        goproxy: str,
        fetch_network: str = "",
    ) -> None:
        if network not in _NETWORKS:
            raise SandboxError(f"build.docker.network: {network!r} is not one of {_NETWORKS}")
        if cache_mode not in _CACHE_MODES:
            raise SandboxError(
                f"build.docker.cache_mode: {cache_mode!r} is not one of {_CACHE_MODES}"
            )
        self.client = client
        self.image = image
        self.network = network
        self.memory = memory
        try:
            self.memory_bytes = int(parse_bytes(memory))
        except DockerException as exc:
            raise SandboxError(f"build.docker.memory: {memory!r} is not a size ({exc})") from exc
        self.pids_limit = pids_limit
        self.cpus = cpus
        self.cache_mode = cache_mode
        self.user = user
        self.worker_id = worker_id
        self.goproxy = goproxy
        #: an internal network fetch steps join instead of ``network`` (the module cache's:
        #: it reaches the worker's module proxy and nothing outside the host)
        self.fetch_network = fetch_network
        self.uid, self.gid = _numeric_user(user)
        if self.uid == 0 or user.partition(":")[0] == "root":
            raise SandboxError(f"build.docker.user: {user!r} is root; steps must run unprivileged")
        if self.uid is not None and os.geteuid() not in (0, self.uid):
            # only a root worker can hand its directories to another user (see _give)
            raise SandboxError(
                f"build.docker.user: steps running as {user} could not write the work "
                f"directories of a worker running as uid {os.geteuid()}: run the worker as "
                f"root, or set build.docker.user to {os.geteuid()}:{os.getegid()}"
            )
        root = cache_dir.resolve() / "docker"
        self.modcache = root / "mod"
        self.buildcache = root / "build"
        self.copies = root / "build-copy"
        # kept across builds, as go keeps it: a checksum database that forks or rolls back
        # its log is then noticed, not trusted anew by every build
        self.sumdb = root / "sumdb"
        try:
            for directory in (self.modcache, self.buildcache, self.copies, self.sumdb):
                directory.mkdir(parents=True, exist_ok=True)
            # the worker may run as root; the steps run as the sandbox user and write these
            self._give(self.modcache)
            self._give(self.buildcache)
            self._give(self.sumdb)
        except OSError as exc:
            raise SandboxError(f"build.cache_dir: cannot prepare {root}: {exc}") from exc
        try:
            self.image_id: str = client.images.get(image).id
        except ImageNotFound as exc:
            raise SandboxError(
                f"sandbox image {image} not found: build it with worker_image/build_images.sh "
                "(make images) or pull it"
            ) from exc
        except _ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot inspect sandbox image {image}: {exc}") from exc
        self.identity = f"docker:{self.image_id}"
        self.host = _process_space()
        self.instance = uuid.uuid4().hex
        self._version: str | None = None
        self._version_lock = threading.Lock()

    # -- the Sandbox protocol ---------------------------------------------------------

    def go_version(self) -> str:
        """Return ``go env GOVERSION`` as the image reports it (asked once)."""
        with self._version_lock:
            if self._version is None:
                self._version = self._probe(["go", "env", "GOVERSION"]).strip()
            return self._version

    def run(
        self,
        step: Step,
        *,
        workdir: Path,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run one step in a new container; kill it on timeout, cancel, or at the pids limit."""
        started = time.monotonic()
        if cancel is not None and cancel.is_set():
            return StepResult(exit_code=-1, output="", duration=0.0, killed="cancelled")
        workdir = workdir.resolve()
        if not workdir.is_dir():
            raise SandboxError(f"work directory {workdir} does not exist")
        private_cache: Path | None = None
        try:
            try:
                self._give_tree(workdir)
                if not step.network and (self.cache_mode == "copy" or step.cacheprog):
                    private_cache = self._copy_build_cache(step, empty=bool(step.cacheprog))
            except OSError as exc:
                raise SandboxError(
                    f"cannot prepare the directories of the {step.name} step: {exc}"
                ) from exc
            options = self._options(step, workdir, private_cache)
            try:
                container = self.client.containers.create(**options)
            except ImageNotFound as exc:
                raise SandboxError(f"sandbox image {self.image} ({self.image_id}) is gone") from exc
            except _ENGINE_ERRORS as exc:
                raise SandboxError(f"cannot create the {step.name} container: {exc}") from exc
            try:
                return self._supervise(container, step, started, on_output, cancel)
            except _ENGINE_ERRORS as exc:
                raise SandboxError(f"the engine failed during the {step.name} step: {exc}") from exc
            finally:
                _remove(container)
        finally:
            if private_cache is not None:
                shutil.rmtree(private_cache, ignore_errors=True)

    @contextlib.contextmanager
    def session(
        self, name: str, *, workdir: Path, network: bool, build_key: str, timeout: float
    ) -> Iterator[DockerSession]:
        """Run the steps of phase ``name`` with exec in one container; remove it on leaving."""
        session = DockerSession(self, name, workdir=workdir, network=network,
                                build_key=build_key, timeout=timeout)
        try:
            yield session
        finally:
            session.close()

    def cleanup_orphans(self, *, all_workers: bool = False) -> int:
        """Remove sandbox containers no live worker supervises; return how many.

        A container is an orphan when it carries this worker's id (a predecessor's, as
        this sandbox never sees its own), when its step is long past its deadline, or when
        it was started on this host by a process that is gone. ``all_workers`` removes
        every sandbox container on the engine, live ones included.
        """
        try:
            found = self.client.containers.list(
                all=True, sparse=True, filters={"label": [SANDBOX_LABEL]}
            )
        except _ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot list sandbox containers: {exc}") from exc
        removed = 0
        for container in found:
            labels = container.attrs.get("Labels") or {}
            if (all_workers or self._orphaned(labels)) and _remove(container):
                removed += 1
        # private build caches of steps that are over, named by their deadline
        for leftover in self.copies.iterdir():
            deadline = leftover.name.partition("-")[0]
            if all_workers or (deadline.isdigit()
                               and int(deadline) + ORPHAN_GRACE_SECONDS < time.time()):
                shutil.rmtree(leftover, ignore_errors=True)
        if removed:
            log.info("removed %d leftover sandbox container(s)", removed)
        return removed

    def _owner_labels(self) -> dict[str, str]:
        return {
            WORKER_LABEL: self.worker_id,
            HOST_LABEL: self.host,
            PID_LABEL: str(os.getpid()),
            INSTANCE_LABEL: self.instance,
        }

    def _orphaned(self, labels: dict[str, str]) -> bool:
        """Tell whether a sandbox container with ``labels`` has no live supervisor."""
        if labels.get(INSTANCE_LABEL) == self.instance:
            return False  # one of ours, still being run
        if self.worker_id and labels.get(WORKER_LABEL) == self.worker_id:
            return True
        deadline = labels.get(DEADLINE_LABEL, "")
        if deadline.isdigit() and int(deadline) + ORPHAN_GRACE_SECONDS < time.time():
            return True
        pid = labels.get(PID_LABEL, "")
        return (
            "pid:[" in self.host  # pids mean something only within one known namespace
            and labels.get(HOST_LABEL) == self.host
            and pid.isdigit()
            and not _alive(int(pid))
        )

    # -- containers -------------------------------------------------------------------

    def _options(self, step: Step, workdir: Path, private_cache: Path | None) -> dict[str, Any]:
        mounts = [Mount(WORK_PATH, str(workdir), type="bind", read_only=False)]
        owner = "mode=1777" if self.uid is None else f"uid={self.uid},gid={self.gid},mode=700"
        tmpfs = {
            "/tmp": f"rw,exec,nosuid,nodev,size={self.memory_bytes},mode=1777",
            HOME_PATH: f"rw,nosuid,nodev,size={HOME_TMPFS_BYTES},{owner}",
        }
        if step.network:
            proxies = self._proxy_urls(step)
            local = [Path(unquote(urlparse(url).path)) for url in proxies
                     if url.startswith("file://")]
            only_local = bool(proxies) and len(local) == len(proxies)
            network = "none" if self.network == "none" or only_local else self.network
            if self.fetch_network and not only_local:
                network = self.fetch_network
            for directory in local:
                mounts.append(Mount(str(directory), str(directory), type="bind", read_only=True))
            mounts.append(Mount(MODCACHE_PATH, str(self.modcache), type="bind", read_only=False))
            mounts.append(Mount(SUMDB_PATH, str(self.sumdb), type="bind", read_only=False))
            # the fetch step has the network: it must not write the shared build cache
            tmpfs[BUILDCACHE_PATH] = f"rw,nosuid,nodev,size={self.memory_bytes},{owner}"
        else:
            network = "none"
            mounts.append(Mount(MODCACHE_PATH, str(self.modcache), type="bind", read_only=True))
            cache = private_cache if private_cache is not None else self.buildcache
            mounts.append(Mount(BUILDCACHE_PATH, str(cache), type="bind", read_only=False))
        environment = dict(step.env)
        if step.cacheprog is not None and not step.network:
            # the fleet build cache: the step reads the outputs and asks the worker through
            # the build's socket; no shared cache directory is writable in here (GOCACHE,
            # which go still opens, is an empty private directory, thrown away after)
            mounts.append(Mount(CACHEPROG_SOCKET, str(step.cacheprog.socket), type="bind",
                                read_only=True))
            mounts.append(Mount(CACHEPROG_OUTPUTS, str(step.cacheprog.outputs), type="bind",
                                read_only=True))
            environment.update(GOCACHEPROG=CACHEPROG_PROGRAM,
                               KILN_CACHEPROG_SOCKET=CACHEPROG_SOCKET,
                               KILN_CACHEPROG_OUTPUTS=CACHEPROG_OUTPUTS)
        return {
            "image": self.image_id,
            "command": list(step.argv),
            "environment": environment,
            "user": self.user,
            "working_dir": WORK_PATH,
            "labels": {
                **self._owner_labels(),
                SANDBOX_LABEL: step.build_key,
                STEP_LABEL: step.name,
                DEADLINE_LABEL: str(int(time.time() + step.timeout + EXIT_WAIT_SECONDS)),
            },
            "name": f"kiln-{_UNSAFE_NAME.sub('_', step.name)}-{uuid.uuid4().hex[:12]}",
            "network_mode": network,
            "mounts": mounts,
            "tmpfs": tmpfs,
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "mem_limit": self.memory_bytes,
            "memswap_limit": self.memory_bytes,
            "pids_limit": self.pids_limit,
            "nano_cpus": int(self.cpus * 1e9),
            # a real init reaps orphans, so zombies do not count against pids_limit
            "init": True,
            "stdin_open": False,
            "tty": False,
            # the output is read from the attach stream: the engine need not keep a copy
            "log_config": LogConfig(type="none"),
        }

    def _proxy_urls(self, step: Step) -> list[str]:
        """Return the GOPROXY entries of a step (its own GOPROXY, else the configured one).

        A step with GOPROXY=off (the builder's module-cache-only first try) gets the
        configured ones: it needs none, and the session's container it may start must serve
        the steps after it, which use them (mounts, and no network for file:// alone).
        """
        value = step.env.get("GOPROXY", "")
        if value in ("", "off"):
            value = self.goproxy
        return [part for part in re.split(r"[,|]", value) if part and part != "off"]

    def _supervise(
        self,
        container: Any,
        step: Step,
        started: float,
        on_output: OutputCallback | None,
        cancel: threading.Event | None,
    ) -> StepResult:
        killed: list[str] = []
        #: one entry per look at the process count: near the limit or not
        crowded: list[bool] = []
        done = threading.Event()

        def watch() -> None:
            self._watch(container, started + step.timeout, cancel, done, killed, crowded)

        lines = _Lines(on_output)

        # attach before starting: a follow of the logs can drop a last line that has no
        # newline, and the attach stream carries the output as it is written
        output = container.attach(stdout=True, stderr=True, stream=True, logs=False)
        watcher = threading.Thread(target=watch, name=f"kiln-watch-{container.short_id}",
                                   daemon=True)
        try:
            container.start()
            watcher.start()
            lines.read(output)
            remaining = max(0.0, started + step.timeout - time.monotonic())
            status = container.wait(timeout=remaining + EXIT_WAIT_SECONDS)
            container.reload()
        finally:
            done.set()
            output.close()
            if watcher.is_alive():
                watcher.join(timeout=5)
        code = int(status.get("StatusCode", -1))
        state = container.attrs.get("State", {})
        reason = killed[0] if killed else None
        if reason is None and state.get("OOMKilled"):
            reason = "oom"
        if reason is None and code != 0 and _crowded_out(crowded, lines.text()):
            reason = "pids"
        return StepResult(
            exit_code=code,
            output=lines.text(),
            duration=time.monotonic() - started,
            timed_out=reason == "timeout",
            killed=reason,
        )

    def _kill(self, container: Any, reason: str, killed: list[str]) -> bool:
        """Kill the container for ``reason``; tell whether it is over (killed or ended)."""
        try:
            container.kill()
        except NotFound:
            return True
        except APIError as exc:
            if exc.status_code == 409:  # not running: it ended on its own
                return True
            log.warning("cannot kill sandbox container %s: %s", container.short_id, exc)
            return False
        except _ENGINE_ERRORS as exc:
            log.warning("cannot kill sandbox container %s: %s", container.short_id, exc)
            return False
        killed.append(reason)
        return True

    def _watch(
        self,
        container: Any,
        deadline: float,
        cancel: threading.Event | None,
        done: threading.Event,
        killed: list[str],
        crowded: list[bool],
    ) -> None:
        """Until ``done``, kill the container at ``deadline``, on cancel, or at the pids limit.

        Each look at the process count is appended to ``crowded`` (near the limit or not).
        """
        next_pids = time.monotonic() + PIDS_CHECK_SECONDS
        strikes = 0
        while not done.is_set():
            cancelled = False
            if cancel is not None:
                cancelled = cancel.wait(WATCH_SECONDS)
            else:
                done.wait(WATCH_SECONDS)
            if done.is_set():
                return
            now = time.monotonic()
            reason: str | None = None
            if cancelled:
                reason = "cancelled"
            elif now >= deadline:
                reason = "timeout"
            elif now >= next_pids:
                near = self._near_pids_limit(container)
                crowded.append(near)
                next_pids = time.monotonic() + PIDS_CHECK_SECONDS
                strikes = strikes + 1 if near else 0
                if strikes >= PIDS_STRIKES:
                    reason = "pids"
            if reason is not None:
                if self._kill(container, reason, killed):
                    return
                done.wait(KILL_RETRY_SECONDS)  # the engine hiccuped: try again

    def _near_pids_limit(self, container: Any) -> bool:
        """Tell whether the step holds nearly all the processes (threads) it may."""
        try:
            stats = container.stats(stream=False, one_shot=True)
        except _ENGINE_ERRORS:
            return False
        pids = stats.get("pids_stats") or {}
        current = pids.get("current") or 0
        return bool(current) and current >= PIDS_NEAR_LIMIT * self.pids_limit

    def _probe(self, argv: list[str]) -> str:
        """Run a command of the image with no network and no mounts; return its output."""
        options = {
            "image": self.image_id,
            "command": argv,
            "user": self.user,
            "labels": {
                **self._owner_labels(),
                SANDBOX_LABEL: "",
                STEP_LABEL: "probe",
                DEADLINE_LABEL: str(int(time.time() + PROBE_TIMEOUT_SECONDS)),
            },
            "network_mode": "none",
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "tmpfs": {"/tmp": "rw,nosuid,nodev", HOME_PATH: "rw,nosuid,nodev,mode=1777"},
            "log_config": PROBE_LOG,
        }
        try:
            container = self.client.containers.create(**options)
        except _ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot run {' '.join(argv)} in {self.image}: {exc}") from exc
        try:
            container.start()
            status = container.wait(timeout=PROBE_TIMEOUT_SECONDS)
            out = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
            if status.get("StatusCode") != 0:
                err = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
                raise SandboxError(f"{' '.join(argv)} failed in {self.image}: {err.strip()}")
            return str(out)
        except _ENGINE_ERRORS as exc:
            raise SandboxError(f"cannot run {' '.join(argv)} in {self.image}: {exc}") from exc
        finally:
            _remove(container)

    # -- host directories -------------------------------------------------------------

    def _copy_build_cache(self, step: Step, *, empty: bool = False) -> Path:
        """Return a private copy of the shared build cache (or an empty directory) for one
        compile step."""
        deadline = int(time.time() + step.timeout + EXIT_WAIT_SECONDS)
        prefix = f"{deadline}-{_UNSAFE_NAME.sub('_', step.build_key)[:16] or 'step'}-"
        target = Path(tempfile.mkdtemp(prefix=prefix, dir=self.copies))
        try:
            if not empty:
                shutil.copytree(self.buildcache, target, symlinks=True, dirs_exist_ok=True)
            self._give_tree(target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return target

    def _give(self, path: Path) -> None:
        """Make ``path`` owned by the sandbox user when the worker is root."""
        if self.uid is None or os.geteuid() != 0:
            return
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.chown(path, self.uid, self.gid if self.gid is not None else -1,
                     follow_symlinks=False)

    def adopt(self, path: Path) -> None:
        """Hand a directory or file the worker created in the module cache to the steps'
        user (not what is in it)."""
        self._give(path)

    def _give_tree(self, root: Path) -> None:
        """Hand ``root`` and everything in it to the sandbox user, never following links."""
        if self.uid is None or os.geteuid() != 0:
            return
        self._give(root)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                self._give(Path(dirpath, name))
