"""The Docker Engine as the docker sandbox uses it: client, labels, limits, output, cleanup."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import docker
import requests
import urllib3
from docker import DockerClient
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig

from kiln.worker.sandbox.base import SandboxError, StepOutput

if TYPE_CHECKING:
    from kiln.config import BuildConfig

log = logging.getLogger(__name__)


#: label carrying the id of the worker that started a container
WORKER_LABEL = "dev.kiln.worker"
#: label carrying the step name (fetch, compile, ...)
STEP_LABEL = "dev.kiln.step"
#: labels naming the process that supervises a container: host name and pid namespace,
#: pid, sandbox object
HOST_LABEL = "dev.kiln.worker.host"
PID_LABEL = "dev.kiln.worker.pid"
INSTANCE_LABEL = "dev.kiln.worker.instance"
#: label carrying the wall-clock time (unix seconds) after which a step is surely abandoned
DEADLINE_LABEL = "dev.kiln.deadline"
#: seconds past its deadline after which any worker may remove a step's container
ORPHAN_GRACE_SECONDS = 60
#: paths inside the sandbox image (see worker_image/sandbox.Dockerfile)
WORK_PATH = "/work"
MODCACHE_PATH = "/go/pkg/mod"
#: where go keeps the checksum database's latest signed tree head ($GOPATH/pkg/sumdb)
SUMDB_PATH = "/go/pkg/sumdb"
BUILDCACHE_PATH = "/cache/go-build"
HOME_PATH = "/home/builder"
#: seconds an API request to the engine may take (streams have no timeout)
CLIENT_TIMEOUT_SECONDS = 60
#: seconds between checks for cancellation and the timeout while a step runs
WATCH_SECONDS = 0.05
#: seconds between looks at a running step's process count
PIDS_CHECK_SECONDS = 0.5
#: a step holding this share of its pids limit for PIDS_STRIKES looks in a row is killed
#: ("pids"): forks start failing near the limit, so a fork bomb settles somewhat below it,
#: while a Go build (GOMAXPROCS follows the CPU limit) stays far from the default 512
PIDS_NEAR_LIMIT = 0.75
PIDS_STRIKES = 3
#: seconds between attempts to kill a step when the engine refuses
KILL_RETRY_SECONDS = 1.0
#: seconds to wait for the exit status once a step's output has ended
EXIT_WAIT_SECONDS = 30
#: what a session's container runs between its steps (busybox and Debian both have these)
IDLE_COMMAND = ("sh", "-c", "while :; do sleep 3600; done")
#: seconds the one-off ``go env GOVERSION`` container may take
PROBE_TIMEOUT_SECONDS = 60
#: size of the tmpfs HOME (Go keeps only small config files there)
HOME_TMPFS_BYTES = 64 * 1024 * 1024
#: the engine's copy of a probe's output (read once it has exited)
PROBE_LOG = LogConfig(type="json-file", config={"max-size": "1m"})
_NETWORKS = ("bridge", "host", "none")
_CACHE_MODES = ("shared", "copy")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    DockerException,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    ConnectionError,
)


def docker_client(
    required: bool = False, *, timeout: float = CLIENT_TIMEOUT_SECONDS
) -> DockerClient | None:
    """Return a client of the engine DOCKER_HOST names, or None (logged) if none answers.

    With ``required`` an unreachable engine raises SandboxError instead. The API version
    is negotiated with the engine.
    """
    try:
        client = docker.from_env(version="auto", timeout=timeout)
        client.ping()
    except _ENGINE_ERRORS as exc:
        reason = f"no Docker Engine answers ({exc})"
        if required:
            raise SandboxError(
                f"{reason}: start dockerd, set DOCKER_HOST, or use build.sandbox: process"
            ) from exc
        log.info("%s; the docker sandbox is not available", reason)
        return None
    return client


class _Lines(StepOutput):
    """The output of a step, read from the engine's stream (see StepOutput)."""

    def read(self, stream: Iterable[bytes]) -> None:
        """Split a stream of UTF-8 chunks into lines until it ends."""
        for chunk in stream:
            self.feed(chunk)
        self.close()


#: what a program says when the kernel refuses it another process or thread (EAGAIN): in
#: a sandbox container, whose pids are limited, that is the limit
_NO_MORE_TASKS = re.compile(
    r"failed to create new OS thread|fork(?:/exec)?[^\n]*: resource temporarily unavailable",
    re.I,
)


def _crowded_out(crowded: list[bool], output: str) -> bool:
    """Tell whether a step that failed was stopped by its pids limit.

    A program whose runtime cannot get another thread dies before PIDS_STRIKES looks (a
    stats call of an engine may take a second, and it may die before the first answers):
    it held nearly all its pids at the last look, or it says the kernel refused a task.
    """
    return (bool(crowded) and crowded[-1]) or bool(_NO_MORE_TASKS.search(output))


def _numeric_user(user: str) -> tuple[int | None, int | None]:
    """Split ``uid[:gid]``; names (which only the image can resolve) give ``(None, None)``."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        return None, None
    return int(uid), int(gid) if gid else int(uid)


def _process_space() -> str:
    """Name where this process's pids are valid: the host name and the pid namespace.

    A worker container on the host network shares the host's name but not its pids.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def _alive(pid: int) -> bool:
    """Tell whether a process with this pid exists here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(container: Any) -> bool:
    """Remove ``container`` (killing it if needed); tell whether it was there to remove."""
    try:
        container.remove(force=True)
    except NotFound:
        return False
    except APIError as exc:
        if exc.status_code == 409:  # removal already in progress
            return True
        log.warning("cannot remove sandbox container %s: %s", container.short_id, exc)
        return False
    except _ENGINE_ERRORS as exc:
        log.warning("cannot remove sandbox container %s: %s", container.short_id, exc)
        return False
    return True


def docker_problem(config: BuildConfig) -> tuple[str, bool] | None:
    """Return why the docker sandbox cannot run here and whether that may pass, or None.

    An engine that does not answer may come up (transient); a missing sandbox image stays
    missing until someone acts.
    """
    client = docker_client()
    if client is None:
        return "no Docker Engine answers (start dockerd or set DOCKER_HOST)", True
    image = config.docker.image
    try:
        client.images.get(image)
    except ImageNotFound:
        return f"no {image} image: run `make images` (or pull it)", False
    except _ENGINE_ERRORS as exc:
        return f"cannot inspect the {image} image ({exc})", True
    finally:
        client.close()
    return None


def docker_unavailable(config: BuildConfig) -> str | None:
    """Return why the docker sandbox cannot run here (no engine or image), or None."""
    problem = docker_problem(config)
    return problem[0] if problem else None


#: the internal network fetch steps join when the module cache is on (kiln/modproxy)
MODCACHE_NETWORK = "kiln-modcache"


def internal_network(client: DockerClient, name: str = MODCACHE_NETWORK) -> str:
    """Return the host's (gateway) address on internal network ``name``, creating it if needed.

    Containers on an internal network reach no address outside the host (no internet, no
    cloud metadata endpoint); they still reach the host's own addresses, where the worker's
    module proxy listens on this gateway address.
    """
    try:
        try:
            network = client.networks.get(name)
        except NotFound:
            network = client.networks.create(name, driver="bridge", internal=True,
                                              labels={"dev.kiln.modcache": "1"},
                                              check_duplicate=True)
            network.reload()
    except _ENGINE_ERRORS as exc:
        raise SandboxError(f"cannot prepare the docker network {name}: {exc}") from exc
    attrs = network.attrs
    if not attrs.get("Internal"):
        raise SandboxError(f"docker network {name} exists but is not internal: remove it "
                           f"(docker network rm {name}) and Kiln creates it as it must be")
    for pool in (attrs.get("IPAM") or {}).get("Config") or []:
        gateway = pool.get("Gateway", "")
        if gateway and ":" not in gateway:
            return str(gateway)
    raise SandboxError(f"docker network {name} has no IPv4 gateway for the module proxy")
