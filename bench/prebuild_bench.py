"""Prebuild: after a Caddy release, how long until the popular builds are ready, and at what cost.

One Kiln per run (``tests/service.py``'s ``KilnProcesses``: gunicorn, a janitor with
``janitor.prebuild`` on, looking every second, ``build.latest_ttl`` 1 s) on a database of
its own, with a fleet of two worker processes (concurrency 1 each, the process sandbox),
each with Go caches of its own, and the synthetic module proxy. Users first build and
download a few configurations on Caddy's latest (different downloads each, one more than
the top N); the janitor records that latest. Then the proxy publishes a Caddy release:

- seconds from the release until the top N configurations are all built on it (the
  release noticed after ``build.latest_ttl``, queued by the janitor, built by the fleet);
- what that cost: the builds queued (exactly N: the others were not popular enough) and
  the worker time they took;
- then users ask for every configuration: the top N are answered from the store (200),
  the one below the cut is queued (202).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.report import Figure, Results, Row
from kiln.db.migrate import Migrator
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, wait_for

LATEST_TTL = 1.0
INTERVAL = 1.0
#: configurations on linux/amd64 by plugin set, most downloaded first; the last is below
#: the top N
CONFIGURATIONS = ((gp.HELLO,), (gp.DNS_PACKAGE,), (gp.HELLO, gp.DNS_PACKAGE), (),
                  (gp.MIXEDCASE,))
SMOKE_CONFIGURATIONS = ((gp.HELLO,), (gp.DNS_PACKAGE,))
TIMEOUT_SECONDS = 900.0


def body(plugins: tuple[str, ...]) -> dict[str, Any]:
    return {"os": "linux", "arch": "amd64", "plugins": list(plugins)}


def release(number: int) -> str:
    """Return the Caddy version run ``number`` publishes (new to every run)."""
    return f"v2.8.{90 + number}"


def prebuilds(db_url: str) -> list[tuple[str, str, float | None]]:
    """Return (key, state, worker seconds) of every prebuild."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT b.key, b.state, (SELECT sum(extract(epoch FROM a.finished_at - a.started_at))"
            "  FROM kiln_attempts a WHERE a.build_key = b.key)::float8"
            "  FROM kiln_builds b WHERE b.requested_by = 'prebuild'").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def seeded(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM kiln_prebuild_versions "
                           "WHERE module = %s", (gp.CADDY,)).fetchone()
    return bool(row and row[0])


def one_run(number: int, *, root: Path, db_url: str, caches: Path | None, shared: Path,
            configurations: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """Seed downloads, publish a release, time the prebuilds; return the figures."""
    top = len(configurations) - 1
    proxy = gp.generate(root / "proxy")
    kiln = KilnProcesses(db_url=db_url, root=root, goproxy=f"file://{proxy}", cache_dir=shared,
                         env={"KILN_BUILD__LATEST_TTL": str(LATEST_TTL),
                              "KILN_WORKER__CONCURRENCY": "1",
                              "KILN_JANITOR__PREBUILD__ENABLED": "true",
                              "KILN_JANITOR__PREBUILD__TOP": str(top),
                              "KILN_JANITOR__PREBUILD__INTERVAL": str(INTERVAL),
                              "KILN_LOGGING__LEVEL": "INFO"})
    with psycopg.connect(db_url, autocommit=True) as conn:
        Migrator(conn).migrate()
    try:
        for name in ("worker-a", "worker-b"):
            # each worker its own Go caches, as two machines of a fleet
            env = {"KILN_BUILD__CACHE_DIR": str(caches / name)} if caches else None
            kiln.start_worker(name, env=env)
        for name in ("worker-a", "worker-b"):
            kiln.wait_for_worker(name)
        kiln.start_api()
        keys = [kiln.post_build(body(c)).json()["key"] for c in configurations]
        for rank, key in enumerate(keys):
            doc = kiln.wait_build(key, timeout=TIMEOUT_SECONDS)
            assert doc["state"] == "succeeded", doc
            for _ in range(len(configurations) - rank):  # the first the most downloaded
                requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=60).raise_for_status()
        kiln.start_janitor()
        wait_for("the janitor to record Caddy's latest", lambda: seeded(db_url), timeout=60)

        gp.publish(proxy, gp.CADDY, release(number))
        released = time.monotonic()

        def all_built() -> bool:
            found = prebuilds(db_url)
            return len(found) == top and all(state == "succeeded" for _, state, _ in found)

        wait_for("the top configurations to be built", all_built, timeout=TIMEOUT_SECONDS,
                 interval=0.1)
        ready = time.monotonic() - released
        statuses = []
        for c in configurations:
            resp = kiln.post_build(body(c))
            statuses.append(resp.status_code)
            assert resp.json()["caddy_version"] == release(number), resp.text
        found = prebuilds(db_url)
        return {"ready_s": round(ready, 2), "prebuilds": len(found), "top": top,
                "worker_s": round(sum(s or 0.0 for _, _, s in found), 2),
                "hits": statuses[:top].count(200), "below_cut": statuses[top]}
    finally:
        kiln.close()


def run(*, root: Path, db_url: Callable[[str], str], shared_cache: Path, repeats: int,
        smoke: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the release ``repeats`` times; return the runs."""
    configurations = SMOKE_CONFIGURATIONS if smoke else CONFIGURATIONS
    # a smoke run builds on the tests' warm caches; a measured one gives each worker its own
    caches = None if smoke else root / "worker-caches"
    runs = []
    for number in range(repeats):
        runs.append(one_run(number, root=root / f"run-{number}",
                            db_url=db_url(f"kiln_bench_prebuild_{number}"), caches=caches,
                            shared=shared_cache, configurations=configurations))
        progress(f"prebuild: run {number + 1}: {runs[-1]}")
    return {"runs": runs, "latest_ttl": LATEST_TTL, "interval": INTERVAL,
            "own_caches": caches is not None,
            "configurations": [list(c) for c in configurations]}


def rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the prebuild runs into rows."""
    runs = data["runs"]
    top = runs[0]["top"]
    hits = [r["hits"] for r in runs]
    results.add(Row(
        f"Caddy release → the top {top} configurations built on it (fleet of 2 workers)",
        Figure.of([r["ready_s"] for r in runs], "s"), "reported", None,
        note=f"janitor.prebuild looks every {data['interval']:g} s, build.latest_ttl "
             f"{data['latest_ttl']:g} s; "
             + ("each worker has Go caches of its own, warmed by the users' builds before"
                if data["own_caches"] else "the workers share the tests' warm Go caches")))
    results.add(Row(
        "extra work of a release: builds the prebuilds queued, worker time they took",
        Figure.of([r["worker_s"] for r in runs], "s"), f"= {top} builds", all(
            r["prebuilds"] == top for r in runs),
        note=f"builds queued: {', '.join(str(r['prebuilds']) for r in runs)} per run; the "
             "configuration below the top N was not built"))
    results.add(Row(
        f"first requests after the release answered from the store (200), of {top}",
        Figure.of(hits, "requests"), f"{top} of {top}", all(h == top for h in hits),
        note="the configuration below the cut was answered "
             + ", ".join(str(r["below_cut"]) for r in runs) + " (202: queued only then)"))
