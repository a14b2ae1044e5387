"""Sandboxes that run build steps: ``process`` everywhere, ``docker`` where an engine answers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kiln.worker.sandbox.base import (
    COMPILE,
    FETCH,
    SANDBOX_LABEL,
    Sandbox,
    SandboxError,
    Step,
    StepResult,
)

if TYPE_CHECKING:
    from kiln.config import BuildConfig

__all__ = [
    "COMPILE",
    "FETCH",
    "SANDBOX_LABEL",
    "Sandbox",
    "SandboxError",
    "Step",
    "StepResult",
    "docker_problem",
    "docker_unavailable",
    "make_sandbox",
]

log = logging.getLogger(__name__)


def docker_problem(config: BuildConfig) -> tuple[str, bool] | None:
    """Return why the docker sandbox cannot run here and whether that may pass, or None.

    An engine that does not answer may come up (transient); a missing SDK or sandbox image
    stays missing until someone acts.
    """
    try:
        from docker.errors import ImageNotFound

        from kiln.worker.sandbox.docker import _ENGINE_ERRORS, docker_client
    except ImportError as exc:
        return f"the docker SDK is not installed ({exc}): pip install docker", False
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
    """Return why the docker sandbox cannot run here (no SDK, engine or image), or None."""
    problem = docker_problem(config)
    return problem[0] if problem else None


def make_sandbox(config: BuildConfig, *, worker_id: str = "") -> Sandbox:
    """Return the sandbox ``build.sandbox`` names.

    ``auto`` picks docker when an engine answers and the sandbox image is there, else
    the process sandbox, and logs why; ``docker`` raises SandboxError saying what is
    missing.
    """
    from kiln.worker.sandbox.process import ProcessSandbox, find_go

    kind = config.sandbox
    if kind == "auto":
        reason = docker_unavailable(config)
        if reason is None:
            kind = "docker"
        else:
            log.warning("build.sandbox auto: using the process sandbox, which isolates the "
                        "environment but not the machine: %s", reason)
    if kind == "docker":
        try:
            from kiln.worker.sandbox.docker import DockerSandbox, docker_client
        except ImportError as exc:
            raise SandboxError(
                f"build.sandbox docker: the docker SDK is not installed ({exc}): "
                "pip install docker"
            ) from exc
        client = docker_client(required=True)
        assert client is not None
        sandbox = DockerSandbox.from_config(config, client=client, worker_id=worker_id)
        log.info("build.sandbox %s: docker, image %s (%s)", config.sandbox,
                 config.docker.image, sandbox.image_id)
        return sandbox
    return ProcessSandbox(go=find_go(config.go), cache_dir=config.cache_dir)
