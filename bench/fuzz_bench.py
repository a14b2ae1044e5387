"""Schemathesis against a running Kiln, at thousands of test cases.

The same service and command line as ``tests/e2e/test_openapi.py``'s
``test_schemathesis_finds_nothing`` (shared in ``tests/fuzzing.py``): gunicorn in keys
mode, a worker on the synthetic module proxy (process sandbox, the shared test Go caches)
that builds one binary and then stops, and ``st run`` against the server's /openapi.json
with every check but ``positive_data_acceptance``, on every operation but the held ones
(``/api/download``, ``/api/compat``). Two passes: **pinned**, as the test, where path
parameters are a real build's key and sha256 so that operations reach past their 404 (with
nothing left to vary, those operations get a few cases each), and **free**, where
Schemathesis generates those too. ``MAX_EXAMPLES`` per operation and phase brings the
total past ``MIN_CASES``. The rows count the cases from the ndjson reports (as
Schemathesis's summary does), the 5xx answers and the failed checks.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.real_bench import shared_test_cache
from bench.report import Figure, Results, Row
from kiln.db.migrate import Migrator
from tests import fuzzing

#: test cases the full run must generate across all operations, both passes together
MIN_CASES = 5000
#: --max-examples of the full run's passes
MAX_EXAMPLES = 200
#: --max-examples of a smoke run: a check that the group runs
SMOKE_EXAMPLES = 2
SEED = 7
#: a full pass takes minutes on two shared cores; past this something hangs
TIMEOUT_SECONDS = 3600


def run(*, db_url: str, root: Path, proxy_dir: Path, smoke: bool,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Serve Kiln, run both Schemathesis passes against it; return their counts."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        Migrator(conn).migrate()
    examples = SMOKE_EXAMPLES if smoke else MAX_EXAMPLES
    out: dict[str, Any] = {"max_examples": examples, "seed": SEED, "passes": {}}
    with fuzzing.serve(db_url=db_url, root=root / "service", proxy_dir=proxy_dir,
                       cache_dir=shared_test_cache()) as (service, token):
        progress("fuzz: service up; building the binary the operations read")
        pins = fuzzing.prepare(service, token)
        for name, pinned in (("pinned", pins), ("free", None)):
            work = fuzzing.write_config(root / name, pinned)
            report_dir = root / name / "report"
            argv = fuzzing.command(service, token, max_examples=examples, seed=SEED,
                                   report_dir=report_dir)
            progress(f"fuzz: {name} pass, st run --max-examples {examples}")
            started = time.monotonic()
            proc = subprocess.run(argv, cwd=work, capture_output=True, text=True,
                                  timeout=TIMEOUT_SECONDS, check=False,
                                  env={**os.environ, "NO_COLOR": "1", "COLUMNS": "160"})
            seconds = time.monotonic() - started
            report = fuzzing.read_report(report_dir)
            progress(f"fuzz: {name} pass: {report.cases:,} cases in {seconds:.0f}s, "
                     f"{report.server_errors} server errors, {report.check_failures} "
                     f"failed checks, exit {proc.returncode}")
            out["passes"][name] = {
                "seconds": seconds, "exit_code": proc.returncode, "cases": report.cases,
                "operations": len(report.operations), "server_errors": report.server_errors,
                "check_failures": report.check_failures, "failures": report.failures,
                "errors": report.errors,
                # what to look at when a figure is not 0
                "output_tail": proc.stdout[-8000:] if proc.returncode else "",
            }
        if any(p["server_errors"] for p in out["passes"].values()):
            out["api_log_tail"] = service.log("api")[-8000:]
    return out


def rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the passes into rows: the cases (≥ MIN_CASES) and the 5xx answers (0) judged."""
    passes: dict[str, dict[str, Any]] = data["passes"]

    def total(key: str) -> int:
        return sum(p[key] for p in passes.values())

    split = ", ".join(f"{name} {p['cases']:,}" for name, p in passes.items())
    operations = max((p["operations"] for p in passes.values()), default=0)
    seconds = sum(p["seconds"] for p in passes.values())
    results.add(Row(
        f"Schemathesis against /openapi.json: test cases over {operations} operations "
        f"(--max-examples {data['max_examples']}, seed {data['seed']})",
        Figure.of([total("cases")], "cases"), f"≥ {MIN_CASES:,}",
        total("cases") >= MIN_CASES, note=f"{split}; {seconds:.0f} s"))
    failures: dict[str, int] = {}
    errors = 0
    for p in passes.values():
        errors += len(p["errors"])
        for check, count in p["failures"].items():
            failures[check] = failures.get(check, 0) + count
    found = ", ".join(f"{check} {count}" for check, count in sorted(failures.items()))
    results.add(Row(
        "Schemathesis: server errors (5xx answers)", Figure.of([total("server_errors")],
                                                               "answers"),
        "0", total("server_errors") == 0,
        note=f"failed checks {total('check_failures')}" + (f" ({found})" if found else "")
             + f"; operations Schemathesis could not test {errors}"))
