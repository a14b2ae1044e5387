"""Docker Engine helpers for tests: is an engine here, and is the sandbox image built.

Tests that need Docker skip with the reason when no engine answers, unless
``KILN_REQUIRE_DOCKER=1`` is set (CI machines that have one): then they fail loudly.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: set to 1 where Docker must be present: a missing engine then fails the tests
REQUIRE_ENV = "KILN_REQUIRE_DOCKER"
#: the image worker_image/build_images.sh builds and tests use
SANDBOX_IMAGE = "kiln-sandbox:latest"
REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "worker_image" / "build_images.sh"
#: seconds the image build may take (the first one imports a ~250 MB Go toolchain)
BUILD_TIMEOUT_SECONDS = 900


def docker_required() -> bool:
    """Tell whether this run must have a Docker Engine (``KILN_REQUIRE_DOCKER=1``)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


@functools.cache
def _engine_problem() -> str | None:
    """Return why no engine answers, or None when one does (asked once per session)."""
    try:
        import docker
    except ImportError as exc:
        return f"the docker SDK is not installed ({exc})"
    try:
        client = docker.from_env(version="auto", timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means "no usable engine"
        return f"no Docker Engine answers ({exc})"
    return None


def docker_available() -> bool:
    """Tell whether a Docker Engine answers."""
    return _engine_problem() is None


def require_docker() -> None:
    """Skip the calling test without an engine, or fail it when one is required."""
    problem = _engine_problem()
    if problem is None:
        return
    if docker_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    pytest.skip(f"{problem}; set {REQUIRE_ENV}=1 to make this a failure")


@functools.cache
def _build_sandbox_image() -> tuple[float, str | None]:
    """Run the image build once per session; return its seconds and its failure, if any."""
    started = time.monotonic()
    env = dict(os.environ, PYTHON=sys.executable, SANDBOX_IMAGE=SANDBOX_IMAGE)
    try:
        proc = subprocess.run(
            ["sh", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True,
            timeout=BUILD_TIMEOUT_SECONDS, check=False,
        )
    except subprocess.TimeoutExpired:
        return time.monotonic() - started, f"{BUILD_SCRIPT} took over {BUILD_TIMEOUT_SECONDS}s"
    if proc.returncode != 0:
        return time.monotonic() - started, (
            f"{BUILD_SCRIPT} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return time.monotonic() - started, None


def ensure_sandbox_image() -> str:
    """Build (or refresh) the sandbox image once per session; return its tag."""
    require_docker()
    _seconds, failure = _build_sandbox_image()
    if failure is not None:
        pytest.fail(f"cannot build the sandbox image: {failure}", pytrace=False)
    return SANDBOX_IMAGE


def sandbox_image_build_seconds() -> float:
    """Return how long this session's image build took (building it if needed)."""
    return _build_sandbox_image()[0]
