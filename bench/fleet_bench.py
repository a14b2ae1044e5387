"""Fleet: a fresh worker builds with what the fleet fetched and compiled (issue 17).

One Kiln (``tests/service.py``'s ``KilnProcesses``: gunicorn and real worker processes)
with both fleet caches on (``modcache.enabled``, ``buildcache.enabled``) and one store (a
local directory) on a database of its own. Each worker has Go caches of its own
(``build.cache_dir``), as a machine of a fleet does, and builds in the docker sandbox when
its engine and image are there (paths inside the containers are the same on every worker,
as Go's build cache keys need), else in the process sandbox. Real Caddy and real plugins
come from the real Go module proxy, checked against the checksum database
(``tests/realcaddy.py``); ``--smoke`` uses the synthetic proxy and a tiny spec instead.

In one run, one worker at a time (the fleet of two: the first, then a fresh one):

1. worker a, everything empty (its Go caches and the store's modcache/ and buildcache/):
   the cold build of spec S; then, the artifact forgotten (its row and files deleted, as
   the storage GC does), a again: the warm worker's build;
2. worker b, fresh (empty Go caches), the artifact forgotten again: S, whose modules and
   packages the fleet has (its fetch phase against the cold one's; its build against the
   warm and the cold one);
3. worker c, fresh: a new plugin set on the same core (a plugin no worker built);
4. worker d, fresh, S again (artifact forgotten) with the store's module sets deleted (as
   their collection would) and ``modcache.list_ttl`` a day: the fetch steps through the
   module cache alone, no version list asked of upstream again.

5. S is downloaded once (the most downloaded build now), a fresh worker e starts with
   ``worker.warm_up`` 1 (it restores S's module set and prefetches its packages before it
   claims; the warm-up is timed from its log), then S, forgotten, is asked for again.

Workers b and c find S's module set (kiln/modproxy/modsets.py: go.mod, go.sum and the
unpacked modules worker a shared): b skips the fetch steps and unpacks what it lacks.

Each build's phases come from its build log (first fetch line → first compile line →
first upload line → result); hit rates from ``/metrics`` (the fleet's counters, read before
and after each build); the publication of a build's cache entries is timed from the
build's success until the worker logs it; the store's sizes with ``du``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.real_bench import disk_bytes
from bench.report import Figure, Results, Row
from kiln.db.migrate import Migrator
from tests import realcaddy as rc
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, wait_for

#: seconds one build may take (a cold real Caddy: minutes on two shared cores)
BUILD_TIMEOUT_SECONDS = 1800.0
#: seconds the workers' counters take to reach /metrics
FLUSH_SECONDS = 0.2
TARGET_FETCH = 0.20
TARGET_WARM = 1.5
TARGET_COLD = 0.30
TARGET_NEW_SET = 0.50
MODCACHE_RESULTS = ("hit", "miss", "bypass", "passthrough", "refused", "corrupt")
BUILDCACHE_RESULTS = ("local", "store", "miss")
#: modcache.list_ttl of the last fresh worker: longer than a run, so the version lists the
#: fleet asked for are never asked of upstream again (the default is 60 s)
LONG_LIST_TTL = 86400
#: where Python's HTTP clients and the go command find the machine's certificate authorities
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
PUBLISHED = re.compile(r"build cache: published (\d+) of (\d+) entries of build (\w+)")
SETS_RESULTS = ("local", "restored", "miss", "corrupt", "error", "published")
SHARED = re.compile(r"build \w+: shared with the fleet in [\d.]+s")
WARMED = re.compile(r"warmed up with (\d+) of the (\d+) most downloaded builds in ([\d.]+)s")


def sandbox_choice() -> tuple[str, str]:
    """Return the sandbox to use and why: docker when its engine and image answer."""
    from kiln.config import BuildConfig
    from kiln.worker.sandbox.docker_engine import docker_unavailable

    reason = docker_unavailable(BuildConfig())
    if reason is None:
        return "docker", "the docker sandbox"
    return "process", f"the process sandbox (docker: {reason})"


def forget(db_url: str, root: Path, key: str) -> None:
    """Forget a build as the storage GC and its expiry would: its rows and its files."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE column_name = 'build_key'"
            " AND table_schema = current_schema() AND table_name LIKE 'kiln\\_%%'").fetchall()]
        for table in tables:
            conn.execute(psycopg.sql.SQL("DELETE FROM {} WHERE build_key = %s").format(
                psycopg.sql.Identifier(table)), (key,))
        conn.execute("DELETE FROM kiln_builds WHERE key = %s", (key,))
    shutil.rmtree(root / "artifacts" / "builds" / key[:2] / key, ignore_errors=True)


def phases(db_url: str, key: str) -> dict[str, float]:
    """Return a build's fetch, compile and upload seconds and its total, from its log."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT step, min(at), max(at) FROM kiln_build_logs "
                            "WHERE build_key = %s GROUP BY step", (key,)).fetchall()
    first = {r[0]: r[1].timestamp() for r in rows}
    last = max(r[2].timestamp() for r in rows)
    order = [s for s in ("resolve", "fetch", "compile", "upload", "result") if s in first]
    out = {a: first[b] - first[a] for a, b in zip(order, order[1:], strict=False)}
    out["total"] = last - min(first.values())
    return out


def counters(kiln: KilnProcesses) -> dict[str, float]:
    """Return the fleet's cache counters from /metrics."""
    text = requests.get(kiln.url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for metric, label, results in (("kiln_modcache_requests_total", "result", MODCACHE_RESULTS),
                                   ("kiln_modcache_sets_total", "result", SETS_RESULTS),
                                   ("kiln_buildcache_gets_total", "result", BUILDCACHE_RESULTS)):
        for result in results:
            match = re.search(rf'^{metric}\{{{label}="{result}"\}} (\S+)$', text, re.M)
            name = "sets" if "_sets_" in metric else metric.split("_")[1]
            found[f"{name}.{result}"] = float(match.group(1)) if match else 0.0
    for metric in ("published", "prefetched"):
        match = re.search(rf"^kiln_buildcache_{metric}_total (\S+)$", text, re.M)
        found[f"buildcache.{metric}"] = float(match.group(1)) if match else 0.0
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


class Fleet:
    """One Kiln, its workers started one at a time, each with Go caches of its own."""

    def __init__(self, *, root: Path, db_url: str, goproxy: str, gosumdb: str,
                 sandbox: str) -> None:
        self.root, self.db_url = root, db_url
        self.kiln = KilnProcesses(db_url=db_url, root=root, goproxy=goproxy,
                                  cache_dir=root / "go-unused", env={
                                      "KILN_BUILD__GOSUMDB": gosumdb,
                                      "KILN_BUILD__SANDBOX": sandbox,
                                      "KILN_BUILD__FETCH_TIMEOUT": str(BUILD_TIMEOUT_SECONDS),
                                      "KILN_BUILD__COMPILE_TIMEOUT": str(BUILD_TIMEOUT_SECONDS),
                                      "KILN_WORKER__LEASE_SECONDS": "30",
                                      "KILN_WORKER__CONCURRENCY": "1",
                                      "KILN_MODCACHE__ENABLED": "true",
                                      "KILN_BUILDCACHE__ENABLED": "true",
                                      "KILN_METRICS__FLUSH_SECONDS": str(FLUSH_SECONDS),
                                      "KILN_LOGGING__LEVEL": "INFO",
                                      # the proxy's misses are fetched by the worker itself:
                                      # the machine's certificate authorities, as for go
                                      **{name: os.environ[name] for name in CA_VARIABLES
                                         if name in os.environ}})
        self.worker = ""

    def start(self, name: str, env: dict[str, str] | None = None) -> None:
        """Stop the running worker; start ``name`` with empty Go caches of its own."""
        if self.worker:
            self.kiln.stop(self.worker)
        self.worker = name
        self.kiln.start_worker(name, env={"KILN_BUILD__CACHE_DIR": str(self.root / name),
                                          **(env or {})})
        self.kiln.wait_for_worker(name, timeout=120)

    def build(self, body: dict[str, Any]) -> dict[str, Any]:
        """Build ``body`` on the running worker; return its phases, hits and publication."""
        before = counters(self.kiln)
        published_before = len(PUBLISHED.findall(self.kiln.log(self.worker)))
        shared_before = len(SHARED.findall(self.kiln.log(self.worker)))
        resp = self.kiln.post_build(body)
        if resp.status_code not in (200, 202):
            raise RuntimeError(f"POST /api/builds: {resp.status_code} {resp.text}")
        key = resp.json()["key"]
        doc = self.kiln.wait_build(key, timeout=BUILD_TIMEOUT_SECONDS)
        done = time.monotonic()
        if doc["state"] != "succeeded":
            raise RuntimeError(f"build {key} {doc['state']}: {doc.get('error')}\n"
                               + self.kiln.log(self.worker)[-3000:])
        # this worker's next "shared" line (a warm build has the cold one's key)
        wait_for("the build's module set and cache entries shared", lambda: len(
            SHARED.findall(self.kiln.log(self.worker))) > shared_before, timeout=600,
            interval=0.05)
        publish_s = time.monotonic() - done
        found = PUBLISHED.findall(self.kiln.log(self.worker))[published_before:]
        time.sleep(FLUSH_SECONDS * 5)  # the worker's counters reach the shared table
        out: dict[str, Any] = {"key": key, **phases(self.db_url, key),
                               "publish_s": publish_s, "published": int(found[-1][0]),
                               "staged": int(found[-1][1]),
                               "counts": delta(counters(self.kiln), before)}
        return out

    def store_bytes(self) -> dict[str, int]:
        sizes = {name: disk_bytes(self.root / "artifacts" / name)
                 for name in ("modcache", "buildcache")}
        sizes["sets"] = disk_bytes(self.root / "artifacts" / "modcache" / "sets")
        return sizes

    def download(self, key: str) -> None:
        """Download a build's artifact once, as a user does (it counts in the popularity)."""
        resp = requests.get(f"{self.kiln.url}/api/builds/{key}/artifact", timeout=120)
        resp.raise_for_status()

    def warmed_up(self, name: str) -> tuple[int, float]:
        """Wait for worker ``name``'s warm-up; return how many builds it warmed and its s."""
        found = wait_for("the worker's warm-up", lambda: WARMED.search(self.kiln.log(name)),
                         timeout=600, interval=0.1)
        return int(found.group(1)), float(found.group(3))

    def forget_sets(self) -> None:
        """Delete the module sets from the store (as the janitor's collection would)."""
        shutil.rmtree(self.root / "artifacts" / "modcache" / "sets", ignore_errors=True)

    def close(self) -> None:
        self.kiln.close()


@contextmanager
def upstream(smoke: bool, root: Path) -> Iterator[tuple[str, str]]:
    """Yield the GOPROXY and GOSUMDB of the run: the real proxy, or the synthetic one."""
    if not smoke:
        yield rc.GOPROXY, rc.GOSUMDB
        return
    server = gp.serve(gp.generate(root / "proxy"))
    try:
        yield server.url, "off"
    finally:
        server.close()


def specs(smoke: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Return spec S, the new plugin set on S's core, and S's description."""
    if smoke:
        caddy = gp.CADDY_LATEST
        return ({"caddy_version": caddy, "plugins": [f"{gp.HELLO}@{gp.HELLO_VERSIONS[0]}"]},
                {"caddy_version": caddy, "plugins": [gp.DNS_PACKAGE]},
                f"synthetic Caddy {caddy} + hello")
    caddy = rc.newest_caddy()
    cloudflare_next = (*rc.CLOUDFLARE[:2], "v0.2.2", rc.CLOUDFLARE[3])
    return ({"caddy_version": caddy,
             "plugins": [rc.pin(p) for p in (rc.CLOUDFLARE, rc.RATELIMIT, rc.L4TLS)]},
            {"caddy_version": caddy, "plugins": [rc.pin(cloudflare_next)]},
            f"real Caddy {caddy} + cloudflare, caddy-ratelimit, l4tls")


def run(*, root: Path, db_url: Callable[[str], str], smoke: bool,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the fleet once; return its figures."""
    sandbox, sandbox_text = sandbox_choice()
    spec, new_set, described = specs(smoke)
    spec = {"os": "linux", "arch": "amd64", **spec}
    new_set = {"os": "linux", "arch": "amd64", **new_set}
    url = db_url("kiln_bench_fleet")
    with psycopg.connect(url, autocommit=True) as conn:
        Migrator(conn).migrate()
    out: dict[str, Any] = {"spec": described, "new_set": new_set["plugins"],
                           "sandbox": sandbox_text, "smoke": smoke}
    with upstream(smoke, root) as (goproxy, gosumdb):
        fleet = Fleet(root=root / "kiln", db_url=url, goproxy=goproxy, gosumdb=gosumdb,
                      sandbox=sandbox)
        try:
            fleet.start("worker-a")
            fleet.kiln.start_api()
            progress(f"fleet: {described}, {sandbox_text}; cold build on worker-a")
            out["cold"] = fleet.build(spec)
            progress(f"fleet: cold {out['cold']['total']:.1f}s; warm build on worker-a")
            forget(url, fleet.root, out["cold"]["key"])
            out["warm"] = fleet.build(spec)
            out["store_after_a"] = fleet.store_bytes()
            fleet.start("worker-b")
            progress(f"fleet: warm {out['warm']['total']:.1f}s; fresh worker-b")
            forget(url, fleet.root, out["warm"]["key"])
            out["fresh"] = fleet.build(spec)
            fleet.start("worker-c")
            progress(f"fleet: fresh {out['fresh']['total']:.1f}s; new plugin set, worker-c")
            out["new_set_build"] = fleet.build(new_set)
            progress(f"fleet: new plugin set {out['new_set_build']['total']:.1f}s")
            # the same fresh build without the module set (collected), version lists
            # shared for longer than this run: the fetch steps through the module cache
            fleet.start("worker-d", {"KILN_MODCACHE__LIST_TTL": str(LONG_LIST_TTL)})
            forget(url, fleet.root, out["fresh"]["key"])
            out["store_before_d"] = fleet.store_bytes()
            fleet.forget_sets()
            out["fresh_long_ttl"] = fleet.build(spec)
            progress(f"fleet: fresh, lists kept {out['fresh_long_ttl']['total']:.1f}s")
            # users download S; a fresh worker starting with worker.warm_up 1 restores its
            # fleet caches before it claims; then S, forgotten, is asked for again
            fleet.download(out["fresh_long_ttl"]["key"])
            fleet.start("worker-e", {"KILN_WORKER__WARM_UP": "1"})
            out["warmed"], out["warm_up_s"] = fleet.warmed_up("worker-e")
            forget(url, fleet.root, out["fresh_long_ttl"]["key"])
            out["fresh_warmed"] = fleet.build(spec)
            progress(f"fleet: warm-up {out['warm_up_s']:.1f}s, then "
                     f"{out['fresh_warmed']['total']:.1f}s")
            out["store"] = fleet.store_bytes()
        finally:
            fleet.close()
            out["logs"] = str(fleet.kiln.logs)
    return out


def _rate(counts: dict[str, float], cache: str, hits: tuple[str, ...]) -> str:
    asked = sum(v for k, v in counts.items() if k.startswith(cache + ".")
                and k not in ("buildcache.published", "buildcache.prefetched"))
    got = sum(counts.get(f"{cache}.{h}", 0.0) for h in hits)
    return f"{got / asked:.0%} of {asked:,.0f}" if asked else "none asked"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the fleet run into rows."""
    cold, warm, fresh, new = (data[k] for k in ("cold", "warm", "fresh", "new_set_build"))
    head = f"fleet of 2 workers, {data['spec']}, {data['sandbox']}"

    def judged(value: float, target: float) -> bool | None:
        return None if data["smoke"] else value <= target

    def hits(b: dict[str, Any]) -> str:
        sets = ", ".join(f"{k.split('.')[1]} {v:.0f}" for k, v in b["counts"].items()
                         if k.startswith("sets.") and v)
        return (f"module sets: {sets or 'none'}; module cache hits "
                f"{_rate(b['counts'], 'modcache', ('hit',))}, build cache "
                f"hits {_rate(b['counts'], 'buildcache', ('local', 'store'))} "
                f"(from the store when asked {b['counts'].get('buildcache.store', 0):,.0f}, "
                f"prefetched {b['counts'].get('buildcache.prefetched', 0):,.0f})")

    ratio = fresh["fetch"] / cold["fetch"]
    results.add(Row(
        f"{head}: fetch phase of a fresh worker (empty Go caches), modules the fleet fetched "
        "(its module set)",
        Figure.of([fresh["fetch"]], "s"), f"≤ {TARGET_FETCH:.0%} of the upstream-cold fetch",
        judged(ratio, TARGET_FETCH),
        note=f"{ratio:.1%} of the upstream-cold fetch ({cold['fetch']:.1f} s: empty Go "
             f"caches and an empty fleet module cache); {hits(fresh)}"))
    lists = data["fresh_long_ttl"]
    results.add(Row(
        f"{head}: the same fresh fetch phase without a module set (the fetch steps through "
        f"the fleet module cache; modcache.list_ttl {LONG_LIST_TTL:,} s)",
        Figure.of([lists["fetch"]], "s"), f"≤ {TARGET_FETCH:.0%} of the upstream-cold fetch",
        judged(lists["fetch"] / cold["fetch"], TARGET_FETCH),
        note=f"{lists['fetch'] / cold['fetch']:.1%} of the upstream-cold fetch; the whole "
             f"build {lists['total']:.1f} s, {lists['total'] / warm['total']:.2f}× the warm "
             f"worker's; {hits(lists)}"))
    results.add(Row(
        f"{head}: a fresh worker builds a spec the fleet compiled (only the artifact "
        "forgotten), against a warm worker's build",
        Figure.of([fresh["total"]], "s"), f"≤ {TARGET_WARM:g}× warm",
        judged(fresh["total"] / warm["total"], TARGET_WARM),
        note=f"{fresh['total'] / warm['total']:.2f}× the warm worker's {warm['total']:.1f} s "
             f"(fetch {warm['fetch']:.1f} s, compile {warm['compile']:.1f} s); the fresh "
             f"one: fetch {fresh['fetch']:.1f} s, compile {fresh['compile']:.1f} s"))
    results.add(Row(
        f"{head}: the same fresh build against a fully cold one",
        Figure.of([fresh["total"]], "s"), f"≤ {TARGET_COLD:.0%} of cold",
        judged(fresh["total"] / cold["total"], TARGET_COLD),
        note=f"{fresh['total'] / cold['total']:.1%} of the cold build's {cold['total']:.1f} s "
             f"(fetch {cold['fetch']:.1f} s, compile {cold['compile']:.1f} s)"))
    results.add(Row(
        f"{head}: a fresh worker builds a new plugin set on the known core "
        f"({', '.join(data['new_set'])}), against the cold build",
        Figure.of([new["total"]], "s"), f"≤ {TARGET_NEW_SET:.0%} of cold",
        judged(new["total"] / cold["total"], TARGET_NEW_SET),
        note=f"{new['total'] / cold['total']:.1%} of the cold build's {cold['total']:.1f} s; "
             f"fetch {new['fetch']:.1f} s, compile {new['compile']:.1f} s; {hits(new)}"))
    warmed = data["fresh_warmed"]
    results.add(Row(
        f"{head}: a fresh worker started with worker.warm_up 1 (the most downloaded build's "
        "module set and packages restored before it claims) builds that spec, forgotten, "
        "against a warm worker's build",
        Figure.of([warmed["total"]], "s"), f"≤ {TARGET_WARM:g}× warm",
        judged(warmed["total"] / warm["total"], TARGET_WARM),
        note=f"{warmed['total'] / warm['total']:.2f}× the warm worker's {warm['total']:.1f} s "
             f"(fetch {warmed['fetch']:.1f} s, compile {warmed['compile']:.1f} s); its "
             f"warm-up took {data['warm_up_s']:.1f} s ({data['warmed']} build) after it "
             f"started, before its first claim; {hits(warmed)}"))
    store, after_a = data["store"], data["store_after_a"]
    results.add(Row(
        f"{head}: the fleet caches in the store after the five builds (du)",
        Figure.of([(store["modcache"] + store["buildcache"]) / 1e6], "MB"), "reported", None,
        note=f"modcache/ {_mb(store['modcache'])} (module sets before their deletion for "
             f"worker-d: {_mb(data['store_before_d']['sets'])}), buildcache/ "
             f"{_mb(store['buildcache'])} (after worker-a's two builds: "
             f"{_mb(after_a['modcache'])} and {_mb(after_a['buildcache'])})"))
    results.add(Row(
        f"{head}: extra work, sharing a build's module set and cache entries after it "
        "succeeded",
        Figure.of([cold["publish_s"]], "s"), "reported", None,
        note=f"cold build: {cold['published']:,} entries published in "
             f"{cold['publish_s']:.1f} s (the build was already answered and its slot "
             f"free for the next); warm {warm['published']:,} in {warm['publish_s']:.1f} s, "
             f"fresh {fresh['published']:,} in {fresh['publish_s']:.1f} s, new set "
             f"{new['published']:,} in {new['publish_s']:.1f} s; the cold build's hit rates: "
             f"{hits(cold)}"))
