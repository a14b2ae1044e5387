"""The API and the janitor as AWS Lambda handlers, fed the events API Gateway and an ALB send.

Real parts: PostgreSQL, moto's S3 and CloudWatch server, a real worker process building
with the synthetic module proxy. Only the Lambda runtime itself is absent: the handlers
are called with its event shapes and a context object, as the runtime calls them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from functions.api.lambda_handler import ApiFunction, check_config
from functions.janitor.lambda_handler import JanitorFunction
from kiln.config import Config, ConfigError, load_config
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

REGION = "us-east-1"
REPO = Path(__file__).resolve().parents[2]


class Context:
    """What the Lambda runtime passes as ``context`` (the part Kiln reads)."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.deadline = time.monotonic() + seconds
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def gateway_v2(method: str, path: str, *, query: str = "", body: bytes = b"",
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Return an API Gateway HTTP API (payload 2.0) event."""
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": query,
        "headers": {"host": "kiln.example.com", "x-forwarded-proto": "https",
                    "x-forwarded-port": "443", **(headers or {})},
        "requestContext": {
            "apiId": "kiln", "domainName": "kiln.example.com", "stage": "$default",
            "requestId": str(uuid.uuid4()), "timeEpoch": int(time.time() * 1000),
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.7", "userAgent": "curl/8"},
        },
        "body": base64.b64encode(body).decode() if body else "",
        "isBase64Encoded": bool(body),
    }


def alb(method: str, path: str, *, query: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Return an Application Load Balancer event (multi-value headers enabled)."""
    return {
        "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:::tg/kiln"}},
        "httpMethod": method, "path": path,
        "multiValueQueryStringParameters": query or {},
        "multiValueHeaders": {"host": ["kiln.example.com"], "x-forwarded-proto": ["https"],
                              "x-forwarded-for": ["203.0.113.7"]},
        "body": "", "isBase64Encoded": False,
    }


def body_of(response: dict[str, Any]) -> bytes:
    raw = response.get("body") or ""
    return base64.b64decode(raw) if response.get("isBase64Encoded") else raw.encode()


def header(response: dict[str, Any], name: str) -> str | None:
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name.lower():
            return str(value)
    for key, values in (response.get("multiValueHeaders") or {}).items():
        if key.lower() == name.lower():
            return str(values[-1])
    return None


@pytest.fixture
def env(db_url: str, s3_endpoint: str, proxy_dir: Path, monkeypatch: pytest.MonkeyPatch
        ) -> dict[str, str]:
    """Return the function's environment: S3 storage serving redirects, CloudWatch at moto."""
    bucket = f"kiln-lambda-{uuid.uuid4().hex[:8]}"
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": REGION}
    for name, value in {**credentials, "AWS_ENDPOINT_URL_CLOUDWATCH": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    return {
        **credentials,
        "CONFIG_PATH": "/dev/null",
        "KILN_DATABASE__URL": db_url,
        "KILN_DATABASE__POOL_MIN": "0",
        "KILN_DATABASE__POOL_MAX": "2",
        "KILN_STORAGE__BACKEND": "s3",
        "KILN_STORAGE__SERVE": "redirect",
        "KILN_STORAGE__S3__BUCKET": bucket,
        "KILN_STORAGE__S3__ENDPOINT_URL": s3_endpoint,
        "KILN_STORAGE__S3__REGION": REGION,
        "KILN_STORAGE__S3__ADDRESSING_STYLE": "path",
        "KILN_BUILD__GOPROXY": f"file://{proxy_dir}",
        "KILN_BUILD__GOSUMDB": "off",
        "KILN_JANITOR__CLOUDWATCH_NAMESPACE": f"Kiln/test-{bucket}",
    }


@pytest.fixture
def api(env: dict[str, str]) -> Iterator[ApiFunction]:
    function = ApiFunction(load_config(env=env))
    yield function
    function.close()


def register_worker(api: ApiFunction) -> None:
    """Record a live worker, as a starting worker does (builds are keyed by its toolchain)."""
    api.services.queue.register_worker("lambda-test-worker", hostname="test", pid=1,
                                       concurrency=1, sandbox="process:test", go_version="go1.27.3")


def submit(api: ApiFunction, body: dict[str, Any]) -> dict[str, Any]:
    response = api(gateway_v2("POST", "/api/builds", body=json.dumps(body).encode(),
                              headers={"content-type": "application/json"}), Context())
    assert response["statusCode"] in (200, 202), response
    return dict(json.loads(body_of(response)))


def test_a_function_refuses_storage_it_cannot_serve_from() -> None:
    with pytest.raises(ConfigError) as caught:
        check_config(Config())
    assert "KILN_STORAGE__BACKEND=s3" in str(caught.value)
    assert "KILN_STORAGE__SERVE=redirect" in str(caught.value)


def test_health_and_errors_through_api_gateway(api: ApiFunction) -> None:
    health = api(gateway_v2("GET", "/healthz"), Context())
    assert health["statusCode"] == 200
    assert json.loads(body_of(health)) == {
        "status": "ok", "checks": {"database": "ok", "schema": "ok", "store": "ok"}}

    missing = api(gateway_v2("GET", "/api/builds/" + "0" * 64), Context())
    assert missing["statusCode"] == 404
    error = json.loads(body_of(missing))
    assert error["status_code"] == 404 and error["error"]["message"]
    assert header(missing, "X-Request-Id") == error["error"]["id"]


def test_gateway_limit_is_warned_about_once(api: ApiFunction, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    for _ in range(2):
        api(gateway_v2("GET", "/healthz"), Context(seconds=900))
    warnings = [r.getMessage() for r in caplog.records if "API Gateway ends requests" in
                r.getMessage()]
    assert len(warnings) == 1 and "KILN_API__WAIT_REDIRECTS" in warnings[0]


@pytest.mark.slow
def test_build_then_download_through_a_redirect(api: ApiFunction, env: dict[str, str],
                                                tmp_path: Path, go_cache_dir: Path) -> None:
    processes = KilnProcesses(db_url=env["KILN_DATABASE__URL"], root=tmp_path,
                              goproxy=env["KILN_BUILD__GOPROXY"], cache_dir=go_cache_dir,
                              env={k: v for k, v in env.items() if k.startswith(("KILN_", "AWS_"))})
    try:
        processes.start_worker(args=["--max-jobs", "1"])
        processes.wait_for_worker()
        doc = submit(api, {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
                           "plugins": [f"{gp.HELLO}@v0.1.0"]})
        deadline = time.monotonic() + 300
        while doc["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, processes.log("worker")[-3000:]
            time.sleep(0.3)
            doc = json.loads(body_of(api(gateway_v2("GET", f"/api/builds/{doc['key']}"),
                                         Context())))
        assert doc["state"] == "succeeded", doc
    finally:
        processes.close()

    # caddy's own client: GET /api/download, answered with a redirect to the store
    query = f"os=linux&arch=amd64&version={gp.CADDY_OLDEST}&p={gp.HELLO}%40v0.1.0"
    download = api(gateway_v2("GET", "/api/download", query=query), Context())
    assert download["statusCode"] == 302, download
    assert header(download, "X-Kiln-Build-Key") == doc["key"]

    # an ALB event, as a function behind a load balancer receives it: the binary is too
    # large for a function's response, so it is a redirect to a presigned URL of the store
    response = api(alb("GET", f"/api/builds/{doc['key']}/artifact"), Context())
    assert response["statusCode"] == 302, response
    location = header(response, "Location")
    assert location and location.startswith(env["KILN_STORAGE__S3__ENDPOINT_URL"])
    binary = requests.get(location, timeout=30)
    assert binary.status_code == 200
    assert hashlib.sha256(binary.content).hexdigest() == doc["artifact"]["sha256"]


def test_held_download_redirects_and_waits_under_the_gateway_limit(env: dict[str, str]) -> None:
    # max_wait far below the gateway's 29 s; the client is sent round twice, then told
    function = ApiFunction(load_config(env={**env, "KILN_API__MAX_WAIT": "0.5",
                                            "KILN_API__WAIT_REDIRECTS": "2"}))
    try:
        register_worker(function)  # alive, but it never claims: the build stays queued
        query = f"os=linux&arch=amd64&p={gp.HELLO}%40v0.1.0"
        hops = []
        for _ in range(5):
            response = function(gateway_v2("GET", "/api/download", query=query), Context())
            hops.append(response["statusCode"])
            if response["statusCode"] != 307:
                break
            location = header(response, "Location")
            assert location is not None and location.startswith("?")
            query = location[1:]
        assert hops == [307, 307, 504]
        assert query.endswith("kiln_wait=2")
        error = json.loads(body_of(response))
        assert error["status_code"] == 504 and "still queued" in error["error"]["message"]
    finally:
        function.close()


def test_janitor_requeues_an_expired_lease_and_publishes_queue_depth(
        api: ApiFunction, env: dict[str, str]) -> None:
    register_worker(api)
    doc = submit(api, {"os": "linux", "arch": "arm64", "caddy_version": gp.CADDY_OLDEST})
    queue = api.services.queue
    # a worker claims it and dies: its lease runs out
    assert [c.key for c in queue.claim("lambda-test-worker", limit=1, lease_seconds=0.2)] == [
        doc["key"]]
    time.sleep(0.5)

    function = JanitorFunction(load_config(env=env))
    try:
        result = function({"source": "aws.events", "detail-type": "Scheduled Event"}, Context())
    finally:
        function.close()
    assert result["jobs"]["requeue_expired"] == "done"
    assert queue.get(doc["key"]).state == "queued"
    assert result["queue"]["QueuedBuilds"] == 1
    assert result["queue"]["RunningBuilds"] == 0

    cloudwatch = boto3.client("cloudwatch", endpoint_url=env["KILN_STORAGE__S3__ENDPOINT_URL"],
                              region_name=REGION)
    now = dt.datetime.now(dt.UTC)
    stats = cloudwatch.get_metric_statistics(
        Namespace=env["KILN_JANITOR__CLOUDWATCH_NAMESPACE"], MetricName="QueuedBuilds",
        StartTime=now - dt.timedelta(minutes=5), EndTime=now + dt.timedelta(minutes=1),
        Period=60, Statistics=["Maximum"])
    assert [p["Maximum"] for p in stats["Datapoints"]] == [1.0]



def test_queue_depth_counts_only_builds_the_fleet_can_claim(
        api: ApiFunction, env: dict[str, str]) -> None:
    # a rollout left builds keyed with a toolchain no worker runs: an autoscaler scaling on
    # them would add workers that claim nothing. Those builds are published apart, and per
    # toolchain, and the KEDA trigger counts what QueuedBuilds counts
    queue = api.services.queue
    old, other = ("docker:kiln-sandbox@sha256:old", "go1.26.0"), ("docker:b", "go1.27.3")
    queue.register_worker("lambda-other", hostname="test", pid=2, concurrency=2,
                          sandbox=other[0], go_version=other[1])
    register_worker(api)  # process:test with go1.27.3, the newest
    current = ("process:test", "go1.27.3")
    for n, (sandbox, go_version) in enumerate([current] * 2 + [old] * 3 + [other] * 2):
        queue.enqueue(hashlib.sha256(f"depth-{n}".encode()).hexdigest(),
                      {"os": "linux", "arch": "amd64", "sandbox": sandbox,
                       "go_version": go_version})
    assert len(queue.claim("lambda-other", limit=1, lease_seconds=60, sandbox=other[0],
                           go_version=other[1])) == 1

    function = JanitorFunction(load_config(env=env))
    try:
        result = function({"source": "aws.events", "detail-type": "Scheduled Event"}, Context())
    finally:
        function.close()
    assert result["queue"] == {"QueuedBuilds": 3.0, "RunningBuilds": 1.0, "WorkerSlots": 3.0,
                               "UnclaimableBuilds": 3.0}

    cloudwatch = boto3.client("cloudwatch", endpoint_url=env["KILN_STORAGE__S3__ENDPOINT_URL"],
                              region_name=REGION)
    now = dt.datetime.now(dt.UTC)

    def published(name: str, toolchain: tuple[str, str]) -> list[float]:
        dimensions = [{"Name": "Sandbox", "Value": toolchain[0]},
                      {"Name": "GoVersion", "Value": toolchain[1]}]
        stats = cloudwatch.get_metric_statistics(
            Namespace=env["KILN_JANITOR__CLOUDWATCH_NAMESPACE"], MetricName=name,
            Dimensions=dimensions, StartTime=now - dt.timedelta(minutes=5),
            EndTime=now + dt.timedelta(minutes=1), Period=600, Statistics=["Sum"])
        return [p["Sum"] for p in stats["Datapoints"]]  # one series: one value

    # (the totals above go out without dimensions; moto, unlike CloudWatch, answers a
    # query without dimensions with every series of the name added up, so they are read
    # from the function's answer and the per-toolchain series from CloudWatch)
    assert published("QueuedBuilds", current) == [2.0]
    assert published("QueuedBuilds", old) == [3.0]
    assert published("WorkerSlots", old) == [0.0]
    assert published("QueuedBuilds", other) == [1.0]
    assert published("WorkerSlots", other) == [2.0]
    assert published("RunningBuilds", other) == [1.0]

    # and /metrics, which a Prometheus-driven autoscaler reads, counts them the same way
    scraped = body_of(api(gateway_v2("GET", "/metrics"), Context())).decode()
    gauges = {s.name: s.value for family in text_string_to_metric_families(scraped)
              for s in family.samples}
    assert (gauges["kiln_queue_depth"], gauges["kiln_queue_unclaimable"]) == (3.0, 3.0)

    # the Kubernetes workers' KEDA trigger counts the same builds
    scaled_job = next(d for d in yaml.safe_load_all((REPO / "infra/k8s/worker.yaml").read_text())
                      if d["kind"] == "ScaledJob")
    query = scaled_job["spec"]["triggers"][0]["metadata"]["query"]
    with psycopg.connect(env["KILN_DATABASE__URL"]) as conn:
        assert conn.execute(query).fetchone()[0] == 3  # type: ignore[index]


@pytest.mark.slow
def test_the_function_package_serves_on_its_own(env: dict[str, str], tmp_path: Path) -> None:
    """infra/lambda/package.sh's zip holds everything: it answers with no site-packages."""
    import subprocess
    import sys
    import zipfile

    from tests.service import REPO

    built = subprocess.run(["sh", str(REPO / "infra" / "lambda" / "package.sh"),
                            str(tmp_path / "kiln.zip")], capture_output=True, text=True,
                           timeout=600, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert built.returncode == 0, built.stderr
    root = tmp_path / "function"
    with zipfile.ZipFile(tmp_path / "kiln.zip") as package:
        package.extractall(root)
    program = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from functions.api.lambda_handler import handler\n"
        "from functions.janitor import lambda_handler as janitor\n"
        f"event = json.loads({json.dumps(json.dumps(gateway_v2('GET', '/healthz')))})\n"
        "print(json.dumps(handler(event, None)))\n"
    )
    # -S: not even the interpreter's own site-packages, as on the runtime
    ran = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True,
                         text=True, timeout=120, env={**env, "PATH": os.environ["PATH"]},
                         check=False)
    assert ran.returncode == 0, ran.stderr
    response = json.loads(ran.stdout.strip().splitlines()[-1])
    assert response["statusCode"] == 200, response
