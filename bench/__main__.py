"""``python -m bench``: run Kiln's benchmarks and write bench/results.json and results.md.

Groups (``--only``): queue (bench/queue_bench.py), builds (the synthetic Caddy,
bench/build_bench.py), http (bench/http_bench.py), real (real Caddy from the real Go
module proxy beside xcaddy, bench/real_bench.py) and fuzz (Schemathesis against the running
service, bench/fuzz_bench.py); each module's docstring says what its rows mean. With
``--only``, the other groups' rows already in the output's results.json are kept.
``--smoke`` runs every group once with tiny sizes and judges nothing: a check that the
benchmarks still run, not a measurement.

Two groups measure what Kiln promises under load and failure: watchers (live-log streams
and held downloads of one build, under gunicorn's gthread and gevent workers,
bench/watch_bench.py) and recovery (a worker killed, a preemption notice, a PostgreSQL
restart, bench/recovery_bench.py). One measures the prebuilds after a Caddy release:
prebuild (bench/prebuild_bench.py), and one a fresh worker building with the fleet's
module and build caches: fleet (bench/fleet_bench.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import (
    build_bench,
    fleet_bench,
    fuzz_bench,
    http_bench,
    prebuild_bench,
    queue_bench,
    real_bench,
    recovery_bench,
    watch_bench,
)
from bench.bulk_plugin import add_bulk
from bench.infra import fresh_database, load_average, postgres, remove_tree, server_version
from bench.report import Figure, Results, Row, percentile
from tests.fixtures import goproxy as gp

HERE = Path(__file__).resolve().parent
GROUPS = ("queue", "builds", "http", "real", "fuzz", "watchers", "recovery", "prebuild",
          "fleet")


def log(message: str) -> None:
    """Print a progress line with the time since the start."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


STARTED = time.monotonic()


def cpu_model() -> str:
    """Return the CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def queue_rows(results: Results, figures: queue_bench.QueueFigures,
               peer_missing: str = "") -> None:
    """Turn the queue figures into rows; without the peer, its comparisons are not judged."""
    kiln, peer = "Kiln", "procrastinate"
    without = f"; procrastinate not measured: {peer_missing}" if peer_missing else ""
    for pct, limit in ((50, 2.0), (99, 10.0)):
        ours = Figure.of([percentile(run, pct) for run in figures.wakeup[kiln]], "ms")
        theirs = (Figure.of([percentile(run, pct) for run in figures.wakeup[peer]], "ms")
                  if figures.wakeup.get(peer) else None)
        samples = len(figures.wakeup[kiln][0])
        floor = Figure.of([percentile(run, pct) for run in figures.floor], "ms")
        results.add(Row(
            f"wake-up latency p{pct} (enqueue commit → claim, {samples:,} samples/run)",
            ours, f"≤ {limit:g} ms, below procrastinate's",
            None if theirs is None else ours.median <= limit and ours.median < theirs.median,
            theirs, peer,
            note=f"floor (a bare LISTEN client, same minutes): {floor.text()}{without}"))
    counts = sorted(figures.throughput[kiln])
    top = max(counts)
    for count in counts:
        ours_runs = figures.throughput[kiln][count]
        theirs_runs = figures.throughput.get(peer, {}).get(count)
        ours = Figure.of(ours_runs.rates, "jobs/s")
        theirs = Figure.of(theirs_runs.rates, "jobs/s") if theirs_runs else None
        ratio = None
        if theirs is not None:
            ratio = ours.median / theirs.median if theirs.median else float("inf")
        note = f"{ratio:.2f}× procrastinate" if ratio is not None else without[2:]
        if count == top:
            async_runs = figures.throughput.get(queue_bench.ASYNC_PEER, {}).get(count)
            if async_runs is not None:
                note += (f"; procrastinate with synchronous_commit=off, as Kiln's worker "
                         f"commits: {Figure.of(async_runs.rates, 'jobs/s').text()}")
        judged = count == top and ratio is not None
        results.add(Row(
            f"claim throughput, {count} worker process{'es' if count > 1 else ''} "
            f"(concurrency {queue_bench.THROUGHPUT_CONCURRENCY} each)",
            ours, "≥ 2,000/s and ≥ 1.5× procrastinate" if count == top else "reported",
            (ours.median >= 2000 and (ratio or 0) >= 1.5) if judged else None, theirs, peer,
            note=note))
    ours_runs = figures.throughput[kiln][top]
    theirs_runs = figures.throughput.get(peer, {}).get(top) or queue_bench.ThroughputRuns()
    if ours_runs.server_cpu_ms and theirs_runs.server_cpu_ms:
        ours = Figure.of([w + s for w, s in zip(ours_runs.worker_cpu_ms,
                                                 ours_runs.server_cpu_ms, strict=False)],
                         "ms")
        theirs = Figure.of([w + s for w, s in zip(theirs_runs.worker_cpu_ms,
                                                   theirs_runs.server_cpu_ms, strict=False)],
                           "ms")
        cores = os.cpu_count() or 1
        results.add(Row(
            f"CPU time per job, workers + PostgreSQL ({top} worker processes)", ours,
            "reported", None, theirs, peer,
            note=f"workers {Figure.of(ours_runs.worker_cpu_ms, 'ms').text()}, PostgreSQL "
                 f"{Figure.of(ours_runs.server_cpu_ms, 'ms').text()}; {cores} idle cores "
                 f"would allow about {cores * 1000 / ours.median:,.0f} jobs/s"))


def build_rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the synthetic build runs into rows, all reported.

    The targets are judged on real Caddy beside xcaddy (``real_rows``); these rows stay to
    show a sandbox's fixed per-step cost (a container start) on a Caddy-sized link
    (``large``) and on a tiny build that is nearly all that cost (``tiny``).
    """
    runs: list[list[build_bench.BuildRun]] = data["runs"]
    by_kind: dict[tuple[str, str], list[build_bench.BuildRun]] = {}
    for run in runs:
        for r in run:
            by_kind.setdefault((r.workload, r.sandbox), []).append(r)
    for workload in ("large", "tiny"):
        bare = by_kind.get((workload, "bare"), [])
        docker = by_kind.get((workload, "docker"), [])
        process = by_kind.get((workload, "process"), [])
        if not bare:
            continue
        size = statistics.median(b.size["warm"] for b in bare) / 1e6
        what = (f"Caddy-sized build ({size:.0f} MB binary)" if workload == "large"
                else f"tiny build ({size:.1f} MB binary)")
        if docker:
            ratios = [d.seconds["warm"] / b.seconds["warm"]
                      for d, b in zip(docker, bare, strict=False)]
            compile_ratios = [d.steps["warm"].get("compile", 0) / b.steps["warm"]["compile"]
                              for d, b in zip(docker, bare, strict=False)]
            fig = Figure.of(ratios, "×")
            warm_d = Figure.of([d.seconds["warm"] for d in docker], "s")
            warm_b = Figure.of([b.seconds["warm"] for b in bare], "s")
            results.add(Row(
                f"sandbox overhead, {what}: warm caches, docker sandbox vs bare go",
                fig, "reported", None,
                note=f"docker {warm_d.text()}, bare {warm_b.text()}; the compile step alone "
                     f"{statistics.median(compile_ratios):.2f}×"))
        elif workload == "large":
            results.add(Row("sandbox overhead: docker sandbox vs bare go", None, "reported",
                            None, note=f"not measured: {data.get('docker_missing')}"))
        if process:
            ratios = [p.seconds["warm"] / b.seconds["warm"]
                      for p, b in zip(process, bare, strict=False)]
            fig = Figure.of(ratios, "×")
            results.add(Row(f"sandbox overhead, {what}: warm caches, process sandbox vs "
                            "bare go", fig, "reported", None))
        for name, kind_runs in (("docker", docker), ("process", process)):
            if not kind_runs:
                continue
            pct = Figure.of([100 * r.seconds["rebuild"] / r.seconds["cold"] for r in kind_runs],
                            "% of cold")
            cold = Figure.of([r.seconds["cold"] for r in kind_runs], "s")
            warm = Figure.of([r.seconds["rebuild"] for r in kind_runs], "s")
            results.add(Row(
                f"warm rebuild, {what}, {name} sandbox (one plugin's version changed)", pct,
                "reported", None,
                note=f"rebuild {warm.text()}, cold (empty Go caches) {cold.text()}"))


def http_rows(results: Results, data: dict[str, Any],
              queue: queue_bench.QueueFigures | None) -> None:
    """Turn the HTTP figures into rows."""
    mib = 2**20
    if data.get("missing"):
        results.add(Row("cache-hit download beside nginx; GET lookups", None,
                        "≥ 0.7× nginx; ≤ 2 ms", False,
                        note=f"not measured: {' and '.join(data['missing'])} not installed "
                             "(apt-get install -y wrk nginx)"))
    kiln = [r["bytes_per_s"] / mib for r in data["download"]["kiln"]]
    nginx = [r["bytes_per_s"] / mib for r in data["download"]["nginx"]]
    if kiln and nginx:
        ratios = [k / n for k, n in zip(kiln, nginx, strict=False)]
        ours, theirs = Figure.of(kiln, "MiB/s"), Figure.of(nginx, "MiB/s")
        ratio = Figure.of(ratios, "×")
        results.add(Row(
            f"cache-hit download, {data['artifact_bytes'] // mib} MB artifact, "
            f"{http_bench.DOWNLOAD_CONNECTIONS} connections (wrk)", ours, "≥ 0.7× nginx",
            ratio.median >= 0.7, theirs, "nginx", note=f"{ratio.text()} nginx"))
    names = {
        "status": "status lookup p50: GET /api/builds/{key}",
        "download_head": "download lookup p50: HEAD /api/download (cached; Python client)",
        "download_get": "cached GET /api/download p50 (lookup + 1.6 MB binary)",
    }
    for name, title in names.items():
        runs = data["lookup"].get(name)
        if not runs:
            continue
        fig = Figure.of([r["p50_ms"] for r in runs], "ms")
        p99 = Figure.of([r["p99_ms"] for r in runs], "ms")
        targeted = name != "download_get"
        results.add(Row(title, fig, "≤ 2 ms" if targeted else "reported",
                        fig.median <= 2.0 if targeted else None,
                        note=f"p99 {p99.text()}, one request at a time"))
    dedup = data["dedup"]
    if dedup:
        builds = Figure.of([d["builds"] for d in dedup], "build(s)")
        served = [d["served"] for d in dedup]
        ok = all(d["builds"] == 1 and d["served"] == d["clients"] and d["keys"] == 1
                 and d["distinct_bodies"] == 1 and d["matches_artifact"] for d in dedup)
        secs = Figure.of([d["seconds"] for d in dedup], "s")
        results.add(Row(
            f"dedup: {http_bench.DEDUP_CLIENTS} concurrent identical uncached /api/download",
            builds, "exactly 1 build; all served", ok,
            note=f"served {', '.join(f'{s}/{http_bench.DEDUP_CLIENTS}' for s in served)}, "
                 f"all the same binary; {secs.text()} until the last answer"))
    mem = data.get("memory", {})
    if "api" in mem:
        results.add(Row("memory: peak RSS of an API process (gunicorn worker)",
                        Figure.of([mem["api"]], "MiB"), "reported", None,
                        note=f"{data['api_processes']} processes × {data['api_threads']} "
                             "threads, after the downloads, lookups and dedup above"))
    worker_note = "the worker that ran the dedup builds"
    if "worker" in mem:
        if queue is not None:
            peaks = {side: max(r.peak_rss_mib for r in runs.values())
                     for side, runs in queue.throughput.items() if runs}
            worker_note += (f"; a no-op worker under the throughput load "
                            f"{peaks.get('Kiln', 0):.0f} MiB (procrastinate's "
                            f"{peaks.get('procrastinate', 0):.0f} MiB)")
        results.add(Row("memory: peak RSS of a worker process",
                        Figure.of([mem["worker"]], "MiB"), "reported", None, note=worker_note))


def real_rows(results: Results, data: dict[str, Any]) -> None:
    """Turn the real Caddy builds into rows: Kiln beside xcaddy, the ratios judged."""
    runs: list[dict[str, dict[str, dict[str, Any]]]] = data["runs"]
    names = ", ".join(p.split("@")[0].rsplit("/", 1)[-1] for p in data["plugins"])
    what = f"real Caddy {data['caddy_version']} + {names}"
    modes = {
        "cold": "cold (empty module and build caches)",
        "warm": ("one build with the shared test caches" if data["smoke"]
                 else "warm (the same build again)"),
        "rebuild": "rebuild (cloudflare v0.2.1 → v0.2.2, warm caches)",
    }

    def fig(builds: list[dict[str, Any]], key: str, unit: str = "s") -> Figure:
        return Figure.of([b[key] for b in builds], unit)

    for mode, title in modes.items():
        for tool in ("process", "docker"):
            limit = real_bench.LIMITS[tool][mode]
            target = f"≤ {limit:g}× xcaddy"
            name = f"{what}, {title}: Kiln's Builder, {tool} sandbox"
            pairs = [(run[tool][mode], run["xcaddy"][mode]) for run in runs
                     if mode in run.get(tool, {}) and mode in run.get("xcaddy", {})]
            failed = {t: data["failed"][t][mode] for t in (tool, "xcaddy")
                      if mode in data["failed"].get(t, {})}
            if failed:
                why = "; ".join(f"{t} failed: {m}" for t, m in failed.items())
            else:
                why = data["missing"].get(tool) or "an earlier build of the run failed"
            if not pairs:
                if any(mode in run.get("xcaddy", {}) for run in runs) or failed:
                    results.add(Row(name, None, target, False, note=f"not measured: {why}"))
                continue
            ours, theirs = [k for k, _ in pairs], [x for _, x in pairs]
            ratio = Figure.of([k["seconds"] / x["seconds"] for k, x in pairs], "×")
            same = all(k["sha256"] == x["sha256"] for k, x in pairs)
            note = (("" if not failed else f"only {len(pairs)} run(s): {why}; ")
                    + f"{ratio.text()} xcaddy; before go build "
                    f"{fig(ours, 'before_compile').text()} (xcaddy "
                    f"{fig(theirs, 'before_compile').text()}), go build "
                    f"{fig(ours, 'compile').text()} (xcaddy {fig(theirs, 'compile').text()}); "
                    f"CPU time {fig(ours, 'cpu_seconds').text()} (xcaddy "
                    f"{fig(theirs, 'cpu_seconds').text()}); "
                    + ("the same bytes as xcaddy's" if same
                       else "**not the same bytes as xcaddy's**"))
            # a build that failed in any run misses the target, whatever the others took
            results.add(Row(name, fig(ours, "seconds"), target,
                            ratio.median <= limit and not failed, fig(theirs, "seconds"),
                            "xcaddy", note=note))
    real_resource_rows(results, data, what)


def real_resource_rows(results: Results, data: dict[str, Any], what: str) -> None:
    """Add the memory, disk and end-to-end rows of the real Caddy builds."""
    runs: list[dict[str, dict[str, dict[str, Any]]]] = data["runs"]

    def peak(tool: str, key: str) -> Figure | None:
        values = [max(b[key] for b in run[tool].values()) for run in runs if run.get(tool)]
        return Figure.of(values, "MiB") if values else None

    ours, theirs = peak("process", "peak_mib"), peak("xcaddy", "peak_mib")
    ours_single, theirs_single = peak("process", "single_mib"), peak("xcaddy", "single_mib")
    if ours and theirs and ours_single and theirs_single:
        note = (f"the largest single process (VmHWM): Kiln {ours_single.text()}, xcaddy "
                f"{theirs_single.text()}")
        docker, docker_single = peak("docker", "peak_mib"), peak("docker", "single_mib")
        docker_cgroup = peak("docker", "cgroup_mib")
        if docker and docker_single and docker_cgroup:
            note += (f"; docker sandbox: the containers' processes {docker.text()}, the "
                     f"largest {docker_single.text()}, a container's memory cgroup at its "
                     f"peak (page cache included) {docker_cgroup.text()}")
        results.add(Row(f"memory: peak of a {what} build, its process tree (VmRSS summed, "
                        "sampled every 0.1 s), process sandbox", ours, "reported", None,
                        theirs, "xcaddy", note=note))
    disk = data.get("disk", {})
    if "process" in disk and "xcaddy" in disk:
        def caches(tool: str) -> str:
            return (f"module cache {disk[tool]['mod'] / 1e6:,.0f} MB + build cache "
                    f"{disk[tool]['build'] / 1e6:,.0f} MB")

        note = f"Kiln {caches('process')}; xcaddy {caches('xcaddy')}"
        if "docker" in disk:
            note += f"; docker sandbox {caches('docker')}"
        results.add(Row(
            f"disk: Go caches after the cold, warm and rebuild builds of {what} (du), "
            "process sandbox", Figure.of([sum(disk["process"].values()) / 1e6], "MB"),
            "reported", None, Figure.of([sum(disk["xcaddy"].values()) / 1e6], "MB"), "xcaddy",
            note=note))
    e2e = data.get("end_to_end") or []
    e2e_name = (f"end to end, {what}, warm caches, a spec new to this Kiln: POST /api/builds → "
                "binary downloaded")
    if not e2e:
        failed = data["failed"].get("end_to_end")
        if failed or "process" in data["failed"]:
            why = (f"failed: {next(iter(failed.values()))}" if failed
                   else "the process sandbox's builds failed")
            results.add(Row(e2e_name, None, "reported", None, note=f"not measured: {why}"))
        return

    def text(key: str, unit: str = "s") -> str:
        return Figure.of([e[key] for e in e2e], unit).text()

    def step(name: str) -> str:
        return Figure.of([e["steps"].get(name, 0.0) for e in e2e], "s").text()

    direct = [run["process"]["warm"]["seconds"] for run in runs
              if "warm" in run.get("process", {})]
    results.add(Row(
        e2e_name, Figure.of([e["seconds"] for e in e2e], "s"), "reported", None,
        note=f"the build's own time (worker log, first line → result) {text('build_seconds')}: "
             f"fetch {step('fetch')}, compile {step('compile')}, upload {step('upload')}; "
             f"POST → claimed {text('claimed_seconds')} (the POST answered in "
             f"{text('post_seconds')}, enqueued → claimed {text('queued_seconds')}); "
             "finished → seen by the client "
             f"{text('seen_after_finish_seconds')} (polling every {real_bench.POLL_SECONDS:g} "
             f"s); download {text('download_seconds')}; "
             + (f"the Builder alone, warm: {Figure.of(direct, 's').text()}; " if direct else "")
             + f"worker peak: its process tree {text('worker_tree_peak_mib', 'MiB')}, the "
               f"worker process alone (VmHWM) {text('worker_peak_mib', 'MiB')}"))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and one run each (minutes, not a publishable run)")
    parser.add_argument("--only", action="append", choices=GROUPS,
                        help="run only this group (repeatable)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per figure (default 3)")
    parser.add_argument("--database-url", default=os.environ.get("KILN_BENCH_DATABASE_URL"),
                        help="a PostgreSQL server to use instead of an embedded one")
    parser.add_argument("--smoke", action="store_true",
                        help="every group once with tiny sizes, nothing judged: a check that "
                             "the benchmarks run (needs --output)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where results.json and results.md go (default bench/)")
    args = parser.parse_args(argv)
    if args.smoke and args.output is None:
        parser.error("--smoke needs --output: its figures must not replace bench/results.*")
    output: Path = args.output or HERE
    groups = set(args.only or GROUPS)
    repeats = 1 if args.smoke else args.repeats or (1 if args.quick else 3)
    results = Results()
    results.machine = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
        "load_start": load_average(), "repeats": repeats, "quick": args.quick,
        "smoke": args.smoke, "groups": sorted(groups),
    }
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    logs = root / "logs"
    log(f"work directory {root} (process logs in {logs})")
    queue_figures: queue_bench.QueueFigures | None = None
    cache_for_http = root / "http-cache"
    try:
        with postgres(args.database_url) as server:
            results.machine["postgres"] = server_version(server.url)
            log(f"PostgreSQL {results.machine['postgres']} ready")
            proxy_dir = gp.generate(root / "goproxy")
            if "queue" in groups:
                results.group = "queue"
                missing = queue_bench.peer_missing()
                if missing:
                    log(f"queue: Kiln's side alone: {missing}")
                queue_figures = queue_bench.run(
                    kiln_url=fresh_database(server.url, "kiln_bench_queue"),
                    procrastinate_url=fresh_database(server.url, "procrastinate_bench"),
                    logs=logs, samples=20 if args.smoke else 200 if args.quick else 1000,
                    repeats=repeats, jobs=100 if args.smoke else 1000 if args.quick else 5000,
                    worker_counts=(1,) if args.smoke else (1, 2, 4), progress=log, pg=server,
                    peer=not missing)
                queue_rows(results, queue_figures, missing)
                results.details["queue"] = {
                    "wakeup_ms": {side: [{"p50": percentile(r, 50), "p90": percentile(r, 90),
                                          "p99": percentile(r, 99), "max": max(r)}
                                         for r in runs]
                                  for side, runs in queue_figures.wakeup.items()},
                    "floor_ms": [{"p50": percentile(r, 50), "p90": percentile(r, 90),
                                  "p99": percentile(r, 99), "max": max(r)}
                                 for r in queue_figures.floor],
                    "throughput": {side: {n: vars(r) for n, r in runs.items()}
                                   for side, runs in queue_figures.throughput.items()},
                    "concurrency": queue_bench.THROUGHPUT_CONCURRENCY,
                }
            if "builds" in groups:
                results.group = "builds"
                add_bulk(proxy_dir)
                data = build_bench.run(root=root / "builds", proxy_dir=proxy_dir,
                                       repeats=repeats, progress=log, keep=cache_for_http,
                                       workloads=("tiny",) if args.smoke
                                       else build_bench.WORKLOADS)
                build_rows(results, data)
                results.details["builds"] = {
                    "runs": [[vars(r) for r in run] for run in data["runs"]],
                    "docker_missing": data["docker_missing"]}
            if "http" in groups:
                results.group = "http"
                data = http_bench.run(
                    db_url=fresh_database(server.url, "kiln_bench_http"), root=root / "http",
                    proxy_dir=proxy_dir, cache_dir=cache_for_http, logs=logs, repeats=repeats,
                    seconds=1 if args.smoke else 4 if args.quick else 8, progress=log)
                http_rows(results, data, queue_figures)
                results.details["http"] = data
            if "real" in groups:
                results.group = "real"
                data = real_bench.run(
                    root=root / "real", repeats=repeats, progress=log, smoke=args.smoke,
                    db_url=lambda name: fresh_database(server.url, name))
                real_rows(results, data)
                results.details["real"] = data
            if "watchers" in groups:
                results.group = "watchers"
                data = watch_bench.run(server_url=server.url, root=root / "watchers",
                                       proxy_dir=proxy_dir, smoke=args.smoke, progress=log)
                watch_bench.rows(results, data)
                results.details["watchers"] = data
            if "recovery" in groups:
                results.group = "recovery"
                data = recovery_bench.run(root=root / "recovery", proxy_dir=proxy_dir,
                                          cache_dir=real_bench.shared_test_cache(),
                                          repeats=repeats, smoke=args.smoke, progress=log)
                recovery_bench.rows(results, data)
                results.details["recovery"] = data
            if "prebuild" in groups:
                results.group = "prebuild"
                data = prebuild_bench.run(
                    root=root / "prebuild", repeats=repeats, smoke=args.smoke, progress=log,
                    db_url=lambda name: fresh_database(server.url, name),
                    shared_cache=real_bench.shared_test_cache())
                prebuild_bench.rows(results, data)
                results.details["prebuild"] = data
            if "fleet" in groups:
                results.group = "fleet"
                data = fleet_bench.run(
                    root=root / "fleet", smoke=args.smoke, progress=log,
                    db_url=lambda name: fresh_database(server.url, name))
                fleet_bench.rows(results, data)
                results.details["fleet"] = data
            if "fuzz" in groups:
                results.group = "fuzz"
                data = fuzz_bench.run(
                    db_url=fresh_database(server.url, "kiln_bench_fuzz"), root=root / "fuzz",
                    proxy_dir=proxy_dir, smoke=args.smoke, progress=log)
                fuzz_bench.rows(results, data)
                results.details["fuzz"] = data
    finally:
        results.machine["load_end"] = load_average()
        results.machine["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        results.machine["duration_s"] = round(time.monotonic() - STARTED)
        if args.smoke:  # a check that everything runs, not a measurement
            for row in results.rows:
                row.met = None
        previous = output / "results.json"
        if groups != set(GROUPS) and previous.exists():  # --only X replaces X's rows alone
            results.merge(json.loads(previous.read_text()))
        if results.rows:
            js, md = results.write(output)
            log(f"wrote {js} and {md}")
            sys.stdout.write("\n" + results.markdown())
        remove_tree(root)
    # a missed target is a finding, shown in the table, not a failure of the run
    return 0


if __name__ == "__main__":
    sys.exit(main())
