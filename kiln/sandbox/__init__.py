"""Sandboxes that run build steps: ``process`` everywhere, ``docker`` where an engine answers."""

from __future__ import annotations

from kiln.sandbox.base import (
    COMPILE,
    FETCH,
    SANDBOX_LABEL,
    Sandbox,
    SandboxError,
    Step,
    StepResult,
)

__all__ = [
    "COMPILE",
    "FETCH",
    "SANDBOX_LABEL",
    "Sandbox",
    "SandboxError",
    "Step",
    "StepResult",
    "make_sandbox",
]


def make_sandbox(config: object) -> Sandbox:
    """Return the sandbox ``build.sandbox`` names (``auto``: docker if an engine answers)."""
    from kiln.config import BuildConfig
    from kiln.sandbox.process import ProcessSandbox, find_go

    assert isinstance(config, BuildConfig)
    kind = config.sandbox
    if kind in ("docker", "auto"):
        try:
            from kiln.sandbox.docker import DockerSandbox, docker_client
        except ImportError:
            if kind == "docker":
                raise
        else:
            client = docker_client(required=kind == "docker")
            if client is not None:
                return DockerSandbox.from_config(config, client=client)
    return ProcessSandbox(go=find_go(config.go), cache_dir=config.cache_dir)
