"""The process sandbox runs a step, stops it at its timeout or on cancel, and says why."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kiln.worker.sandbox.base import MAX_LINE_BYTES, Step
from kiln.worker.sandbox.process import ProcessSandbox, find_go


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> ProcessSandbox:
    return ProcessSandbox(go=find_go(), cache_dir=tmp_path_factory.mktemp("cache"))


def test_a_step_returns_its_output_and_exit_code(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    result = sandbox.run(Step("fetch", ("sh", "-c", "echo one; echo two; exit 3")),
                         workdir=tmp_path)
    assert result.exit_code == 3 and result.killed is None
    assert result.output.splitlines() == ["one", "two"]


def test_a_step_past_its_timeout_is_killed(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    result = sandbox.run(Step("compile", ("sleep", "30"), timeout=0.3), workdir=tmp_path)
    assert result.killed == "timeout" and not result.ok


def test_a_cancelled_step_is_killed(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    try:
        result = sandbox.run(Step("compile", ("sleep", "30")), workdir=tmp_path, cancel=cancel)
    finally:
        timer.cancel()
    assert result.killed == "cancelled"


def test_a_child_that_keeps_the_output_open_dies_at_the_timeout(
        sandbox: ProcessSandbox, tmp_path: Path) -> None:
    # the step exits at once, its background child holds stdout open
    result = sandbox.run(Step("fetch", ("sh", "-c", "sleep 30 & exit 0"), timeout=0.5),
                         workdir=tmp_path)
    assert result.killed == "timeout"


def test_a_huge_line_without_newline_is_cut_as_it_is_read(
        sandbox: ProcessSandbox, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    passed: list[str] = []
    result = sandbox.run(
        Step("fetch", ("sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo; echo after")),
        workdir=tmp_path, on_output=passed.append)

    assert result.ok
    huge, after = passed
    assert huge.startswith("x" * 100)
    assert huge.endswith(f"… ({size - MAX_LINE_BYTES} bytes cut)")
    assert len(huge) < MAX_LINE_BYTES + 100
    assert after == "after"
    assert result.output.splitlines() == passed
