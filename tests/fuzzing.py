"""Schemathesis against a running Kiln: the setup the e2e test and the fuzz benchmark share.

``serve`` starts the API (keys mode, an admin key) and a worker on the synthetic module
proxy; ``prepare`` makes a succeeded build and a queued one for operations to reach past
their 404 and stops the worker; ``write_config`` writes Schemathesis's config; ``command``
is the ``st run`` command line; ``read_report`` counts what the ndjson report holds.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses

#: operations Schemathesis leaves out: they hold requests for builds, and answer 502/504
#: by design (caddyserver.com's clients expect those); tests/e2e/test_compat.py covers them
EXCLUDED_PATHS = ("/api/download", "/api/compat")
#: operations that change a build: they get a build of their own, so the artifact the
#: other operations read stays servable
CHANGING = ("POST /api/admin/builds/{key}/rebuild", "DELETE /api/builds/{key}",
            "DELETE /api/admin/builds/{key}/artifact")


@contextlib.contextmanager
def serve(*, db_url: str, root: Path, proxy_dir: Path, cache_dir: Path
          ) -> Iterator[tuple[KilnProcesses, str]]:
    """Run a worker and the API in keys mode on a migrated database; yield it and an admin key."""
    service = KilnProcesses(db_url=db_url, root=root, goproxy=f"file://{proxy_dir}",
                            cache_dir=cache_dir,
                            env={"KILN_AUTH__MODE": "keys", "KILN_API__MAX_WAIT": "2"})
    try:
        service.start_worker()
        service.wait_for_worker()
        service.start_api(threads=8)
        made = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", "create", "fuzz",
                               "--scope", "admin", "--json"], cwd=REPO, env=service.env,
                              capture_output=True, text=True, timeout=60, check=True)
        yield service, json.loads(made.stdout)["token"]
    finally:
        service.close()


@dataclass(frozen=True)
class Pins:
    """Real identifiers for the operations' parameters, so that they reach past their 404."""

    #: a succeeded build, and its artifact's sha256
    key: str
    sha256: str
    #: a queued build for the operations that change one
    spare: str


def prepare(service: KilnProcesses, token: str) -> Pins:
    """Make a succeeded build (unless one exists), stop the worker, queue a spare build.

    Once the worker has stopped, nothing the fuzzing queues gets built.
    """
    auth = {"Authorization": f"Bearer {token}"}
    built = [b for b in requests.get(service.url + "/api/admin/builds",
                                     params={"state": "succeeded"}, headers=auth,
                                     timeout=30).json()["builds"] if "artifact" in b]
    if not built:
        body = {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST}
        key = requests.post(service.url + "/api/builds", json=body, headers=auth,
                            timeout=60).json()["key"]
        built = [service.wait_build(key)]
    service.stop("worker")
    spare = requests.post(service.url + "/api/builds", headers=auth, timeout=60, json={
        "os": "linux", "arch": "riscv64", "caddy_version": gp.CADDY_OLDEST}).json()["key"]
    return Pins(key=built[0]["key"], sha256=built[0]["artifact"]["sha256"], spare=spare)


def write_config(directory: Path, pins: Pins | None) -> Path:
    """Write schemathesis.toml into ``directory`` (``st`` must run there); return it.

    With ``pins``, every operation gets the real identifiers; without, Schemathesis
    generates them too (and nearly every one is a 404 or a 400).
    """
    text = """# read two events of a live stream, then move on
max-stream-events = 2

[checks.negative_data_rejection]
# how an invalid request may be refused: Schemathesis's list, and 413, 414 and 431 (a body,
# a URL or headers past the limits of api.max_body_bytes and gunicorn)
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415",
                     "422", "428", "429", "431", "5xx"]
"""
    if pins is not None:
        text += f"""
[parameters]
key = "{pins.key}"
sha256 = "{pins.sha256}"
name = "app.js"
path = "{gp.HELLO}"
""" + "\n".join(f"""
[[operations]]
include-name = "{name}"
parameters = {{ key = "{pins.spare}" }}
""" for name in CHANGING)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "schemathesis.toml").write_text(text)
    return directory


def command(service: KilnProcesses, token: str, *, max_examples: int, seed: int,
            report_dir: Path) -> list[str]:
    """Return the ``st run`` command: every check, one worker, an ndjson report."""
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "run", service.url + "/openapi.json",
            "--checks", "all",
            # Kiln's validation is semantic (a plugin must exist on the module proxy, a
            # callback host must resolve): a schema cannot say which valid-looking inputs
            # are accepted, so Schemathesis cannot expect them to be
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(max_examples), "--seed", str(seed),
            "--phases", "examples,coverage,fuzzing",
            # one worker: hypothesis's lambda descriptions are not thread-safe on 3.11
            "--workers", "1",
            "--header", f"Authorization: Bearer {token}",
            "--request-timeout", "20", "--no-shrink",
            "--report", "ndjson", "--report-dir", str(report_dir)]
    for path in EXCLUDED_PATHS:
        argv += ["--exclude-path", path]
    return argv


@dataclass
class Report:
    """What one Schemathesis run did, from its ndjson report."""

    #: test cases sent, as Schemathesis's own summary counts them
    cases: int = 0
    #: answers with a 5xx status
    server_errors: int = 0
    #: failed checks but not_a_server_error (whose failures are the 5xx), by check name
    failures: dict[str, int] = field(default_factory=dict)
    #: errors that stopped an operation from being tested, with what Schemathesis said
    errors: list[str] = field(default_factory=list)
    #: operations tested
    operations: set[str] = field(default_factory=set)

    @property
    def check_failures(self) -> int:
        """Return the number of failed checks."""
        return sum(self.failures.values())


def read_report(report_dir: Path) -> Report:
    """Count the cases, 5xx answers, failed checks and errors of the ndjson report."""
    report = Report()
    for path in sorted(report_dir.glob("*.ndjson")):
        for line in path.read_text().splitlines():
            if line.strip():
                _count(report, json.loads(line))
    return report


def _count(report: Report, event: dict[str, Any]) -> None:
    for kind in ("NonFatalError", "FatalError"):
        if kind in event:
            error = event[kind]
            value = error.get("value") or error
            report.errors.append(f"{error.get('label', kind)}: "
                                 f"{json.dumps(value, default=str)[:500]}")
    recorder = event.get("ScenarioFinished", {}).get("recorder") or {}
    cases = recorder.get("cases") or {}
    if not cases:
        return
    report.operations.add(recorder["label"])
    report.cases += len(cases)
    for interaction in (recorder.get("interactions") or {}).values():
        response = interaction.get("response") or {}
        if response.get("status_code", 0) >= 500:
            report.server_errors += 1
    for checks in (recorder.get("checks") or {}).values():
        for check in checks:
            if check["status"] == "failure" and check["name"] != "not_a_server_error":
                report.failures[check["name"]] = report.failures.get(check["name"], 0) + 1
