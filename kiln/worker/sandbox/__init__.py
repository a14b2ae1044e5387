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
]

log = logging.getLogger(__name__)


def docker_problem(config: BuildConfig) -> tuple[str, bool] | None:
    """Return why the docker sandbox cannot run here and whether that may pass, or None.

    An engine that does not answer may come up (transient); a missing SDK or sandbox image
    stays missing until someone acts.
    """
    try:
        from docker.errors import ImageNotFound

        from kiln.worker.sandbox.docker_engine import _ENGINE_ERRORS, docker_client
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
