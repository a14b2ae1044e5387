"""Docker Engine helpers for tests: is an engine here, and is the sandbox image built.

Tests that need Docker skip with the reason when nothing listens where the engine should
be, unless ``KILN_REQUIRE_DOCKER=1`` or ``KILN_NO_SKIPS=1`` is set (CI): then they fail
loudly. Any other Docker error (an engine that answers wrongly or too slowly, a bad
DOCKER_HOST, a missing SDK) fails the test everywhere: it is a fault, not an absent engine.
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
#: set to 1 where no test may skip (tests/conftest.py): Docker must be present too
NO_SKIPS_ENV = "KILN_NO_SKIPS"
#: the image worker_image/build_images.sh builds and tests use
SANDBOX_IMAGE = "kiln-sandbox:latest"
REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "worker_image" / "build_images.sh"
#: seconds the image build may take (the first one imports a ~250 MB Go toolchain)
BUILD_TIMEOUT_SECONDS = 900


def docker_required() -> bool:
    """Tell whether this run must have a Docker Engine (``KILN_REQUIRE_DOCKER=1`` or
    ``KILN_NO_SKIPS=1``)."""
    return "1" in (os.environ.get(REQUIRE_ENV, ""), os.environ.get(NO_SKIPS_ENV, ""))


def cannot_connect(exc: BaseException) -> bool:
    """Tell whether ``exc``, or an error that caused it, says nothing listens for Docker."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        # a socket that is missing or refuses: requests wraps both in its ConnectionError,
        # the Docker SDK wraps that in a DockerException ("Error while fetching server API
        # version"). A timeout is not one of them: an engine that hangs is a fault.
        if isinstance(seen, requests.exceptions.ConnectTimeout):
            return False
        if isinstance(seen, requests.exceptions.ConnectionError | ConnectionRefusedError
                      | FileNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@functools.cache
def _engine_problem() -> tuple[bool, str] | None:
    """Return (absent, why) when no engine is usable, else None (asked once per session).

    ``absent`` is true only when nothing answers where the engine should be; any other
    error is a broken engine or setup, which no test may take for an absent one.
    """
    try:
        import docker
    except ImportError as exc:
        return False, f"the docker SDK is not installed ({exc}): run `make install`"
    try:
        client = docker.from_env(version="auto", timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        if cannot_connect(exc):
            return True, f"no Docker Engine answers ({exc})"
        return False, f"the Docker Engine failed: {type(exc).__name__}: {exc}"
    return None


def docker_available() -> bool:
    """Tell whether a Docker Engine answers."""
    return _engine_problem() is None


def require_docker() -> None:
    """Skip the calling test without an engine, or fail it when one is required.

    A Docker error other than "cannot connect" always fails.
    """
    problem = _engine_problem()
    if problem is None:
        return
    absent, why = problem
    if not absent:
        pytest.fail(why, pytrace=False)
    if docker_required():
        pytest.fail(f"{REQUIRE_ENV}=1 or {NO_SKIPS_ENV}=1 but {why}", pytrace=False)
    pytest.skip(f"{why}; set {REQUIRE_ENV}=1 to make this a failure")


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


def readable_by_sandbox(root: Path) -> Path:
    """Make ``root`` readable by the sandbox's step user (uid 1000), as in production; return it.

    A ``file://`` module proxy is mounted into the steps' containers, which run as that user.
    """
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root
