"""The ``kiln`` client commands against a running Kiln (gunicorn + a worker process)."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses, free_port

pytestmark = pytest.mark.slow


def kiln_cmd(kiln: KilnProcesses | None, *args: str, cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "HOME": os.environ.get("HOME", "/root")}
    if kiln is not None:
        env["KILN_SERVER"] = kiln.url
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd or REPO)


def modules_of(binary: Path) -> str:
    return subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                          text=True, timeout=30, check=True).stdout


@pytest.fixture(scope="module")
def built(kiln: KilnProcesses, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Build with `kiln build --wait -o caddy`; return (key, binary)."""
    work = tmp_path_factory.mktemp("cli-build")
    result = kiln_cmd(kiln, "build", "--os", "linux", "--arch", "amd64", "--caddy", "v2.8.4",
                      "-p", f"{gp.HELLO}@v0.2.0", "--wait", "-o", "caddy", cwd=work)
    assert result.returncode == 0, result.stderr
    key, checksum_line = result.stdout.splitlines()
    binary = work / "caddy"
    assert checksum_line == f"{hashlib.sha256(binary.read_bytes()).hexdigest()}  caddy"
    # not a terminal: progress comes as plain lines
    assert "state: queued" in result.stderr or "state: building" in result.stderr
    assert "step: compile" in result.stderr and "$ go build" in result.stderr
    assert "\x1b[" not in result.stderr
    return key, binary


def test_build_wait_output_gives_a_runnable_binary(built: tuple[str, Path]) -> None:
    _, binary = built
    assert f"{gp.HELLO_ID} v0.2.0" in modules_of(binary)


def test_a_failing_build_exits_1_with_the_go_error(kiln: KilnProcesses, tmp_path: Path) -> None:
    result = kiln_cmd(kiln, "build", "--os", "linux", "--arch", "amd64", "-p", gp.BROKEN,
                      "--wait", "-o", "caddy", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "failed" in result.stderr
    assert "broken.go" in result.stderr and "cannot use" in result.stderr
    assert not (tmp_path / "caddy").exists()


def test_status_logs_download_and_list(kiln: KilnProcesses, built: tuple[str, Path],
                                       tmp_path: Path) -> None:
    key, binary = built
    status = kiln_cmd(kiln, "status", key)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout and f"{gp.HELLO} v0.2.0" in status.stdout
    logs = kiln_cmd(kiln, "logs", key)
    assert logs.returncode == 0 and "==> compile" in logs.stdout
    assert "$ go build" in logs.stdout
    followed = kiln_cmd(kiln, "logs", "-f", key)  # a finished build: history, then exit
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[-1].startswith("succeeded: ")
    downloaded = kiln_cmd(kiln, "download", key, "-o", str(tmp_path / "again"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "again").read_bytes() == binary.read_bytes()
    assert os.access(tmp_path / "again", os.X_OK)
    listed = kiln_cmd(kiln, "list")
    assert listed.returncode == 0 and key[:12] in listed.stdout


def test_usage_errors_exit_2_and_an_unreachable_server_exits_3(kiln: KilnProcesses) -> None:
    bad = kiln_cmd(kiln, "build", "--os", "plan9", "--arch", "amd64", "--wait")
    assert bad.returncode == 2 and "plan9" in bad.stderr
    unknown = kiln_cmd(kiln, "status", "0" * 64)
    assert unknown.returncode == 2 and "no build" in unknown.stderr
    assert kiln_cmd(kiln, "build", "--arm", "9").returncode == 2  # argparse
    nobody = f"http://127.0.0.1:{free_port()}"
    down = kiln_cmd(None, "build", "--server", nobody, "--os", "linux", "--arch", "amd64")
    assert down.returncode == 3 and nobody in down.stderr


def test_a_terminal_gets_a_live_progress_display(kiln: KilnProcesses, tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: kiln build on a terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "kiln.cli", "build", "--os", "linux",
                                   "--arch", "arm64", "--caddy", gp.CADDY_OLDEST, "-p",
                                   f"{gp.HELLO}@v0.1.0", "--wait"],
                  {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
                   "KILN_SERVER": kiln.url, "TERM": "xterm", "COLUMNS": "100"})
    out = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            out += data
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    # the status line and log tail are redrawn in place (at most every 0.1 s, so which
    # go command is on screen at a redraw depends on timing), then replaced by the outcome
    assert "\x1b[" in text and "building" in text and "$ go " in text
    assert "built caddy_linux_arm64_custom" in text
