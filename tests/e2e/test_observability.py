"""/metrics and JSON logs end to end: two API processes and a worker on one database.

Whichever API process answers the scrape, it reports the whole deployment: gauges and
build durations come from PostgreSQL, and what each process counts (HTTP latency, cache
hits and misses, step durations) is added to the shared table every flush interval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow

FLUSH_SECONDS = 0.3


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_METRICS__FLUSH_SECONDS": str(FLUSH_SECONDS), "KILN_LOGGING__FORMAT": "json"}


def start_two_api_workers(service: KilnProcesses) -> None:
    """Start a worker, then an API of two gunicorn workers (metrics merged across them)."""
    service.start_worker()
    service.wait_for_worker()
    service.start_api(workers=2, threads=4)


@pytest.fixture(scope="module")
def kiln_start() -> Callable[[KilnProcesses], None]:
    return start_two_api_workers


def scrape(kiln: KilnProcesses) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of /metrics by (name, sorted labels)."""
    resp = requests.get(kiln.url + "/metrics", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_cover_the_whole_deployment(kiln: KilnProcesses) -> None:
    body = {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
            "plugins": [f"{gp.HELLO}@v0.1.0"]}
    first = kiln.post_build(body)
    assert first.status_code == 202
    assert kiln.wait_build(first.json()["key"])["state"] == "succeeded"
    assert kiln.post_build(body).status_code == 200  # served from the store
    for _ in range(6):  # spread over both API processes
        requests.get(f"{kiln.url}/api/builds/{'f' * 64}", timeout=30)
    time.sleep(FLUSH_SECONDS * 4)  # every process and the worker have flushed

    # two scrapes, likely answered by both processes, agree on the totals
    for metrics in (scrape(kiln), scrape(kiln)):
        assert metrics[("kiln_builds", (("state", "succeeded"),))] == 1
        assert metrics[("kiln_builds", (("state", "queued"),))] == 0
        assert metrics[("kiln_queue_depth", ())] == 0
        assert metrics[("kiln_workers_alive", ())] == 1
        assert metrics[("kiln_build_requests_total", (("result", "miss"),))] == 1
        assert metrics[("kiln_build_requests_total", (("result", "hit"),))] == 1
        assert metrics[("kiln_build_duration_seconds_count", (("outcome", "succeeded"),))] == 1
        assert metrics[("kiln_build_duration_seconds_bucket",
                        (("le", "+Inf"), ("outcome", "succeeded")))] == 1
        compile_ok = (("result", "ok"), ("step", "compile"))
        assert metrics[("kiln_build_step_duration_seconds_count", compile_ok)] == 1
        fetches = sum(v for (n, labels), v in metrics.items()
                      if n == "kiln_build_step_duration_seconds_count"
                      and ("step", "fetch") in labels)
        assert fetches >= 3  # go get core, the plugin, tidy
        not_found = (("method", "GET"), ("route", "/api/builds/{key}"), ("status", "404"))
        assert metrics[("kiln_http_request_duration_seconds_count", not_found)] == 6
        posts = (("method", "POST"), ("route", "/api/builds"), ("status", "202"))
        assert metrics[("kiln_http_request_duration_seconds_count", posts)] == 1


def test_every_log_line_is_json_with_its_context(kiln: KilnProcesses) -> None:
    resp = requests.get(f"{kiln.url}/api/builds/{'a' * 64}",
                        headers={"X-Request-Id": "trace-me-42"}, timeout=30)
    assert resp.status_code == 404 and resp.headers["X-Request-Id"] == "trace-me-42"
    generated = requests.get(kiln.url + "/healthz", timeout=30).headers["X-Request-Id"]
    assert len(generated) >= 16
    time.sleep(0.5)

    def ours(name: str) -> list[dict[str, object]]:
        # gunicorn's own lines start with "[": everything Kiln logs is one JSON object a line
        lines = [line for line in kiln.log(name).splitlines() if not line.startswith("[")]
        return [json.loads(line) for line in lines if line.strip()]

    api = ours("api")
    assert any(r.get("request_id") == "trace-me-42" and r.get("level") == "INFO"
               and "404" in str(r.get("message")) for r in api)
    requests_seen = [r for r in api if r.get("process_name") == "api"
                     and str(r.get("message", "")).startswith(("GET ", "POST "))]
    assert requests_seen and all(r.get("request_id") for r in requests_seen)

    worker = ours("worker")
    built = [r for r in worker if str(r.get("message", "")).startswith("built ")]
    assert built and all(len(str(r.get("build_key"))) == 64 for r in built)
