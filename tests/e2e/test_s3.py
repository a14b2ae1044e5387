"""End to end with S3: Kiln's real processes store builds in moto's real S3 server.

A user downloads through a 302 to a presigned URL (or a stream through the API), and a
storage outage during a build leaves nothing published and is retried.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, template_database

pytestmark = pytest.mark.slow

#: first retry after 2-6 s: time enough to bring the bucket back before it
RETRY_BASE_SECONDS = 4


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test")


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    name = f"kiln-e2e-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def db(pg_server_url: str, pg_template: str) -> str:
    name = "kiln_s3_e2e"
    return template_database(pg_server_url, pg_template, name)


def s3_env(endpoint: str, bucket: str, serve: str) -> dict[str, str]:
    return {
        "KILN_STORAGE__BACKEND": "s3",
        "KILN_STORAGE__SERVE": serve,
        "KILN_STORAGE__S3__BUCKET": bucket,
        "KILN_STORAGE__S3__ENDPOINT_URL": endpoint,
        "KILN_STORAGE__S3__REGION": "us-east-1",
        "KILN_STORAGE__S3__ACCESS_KEY_ID": "kiln-test",
        "KILN_STORAGE__S3__SECRET_ACCESS_KEY": "kiln-test",
        "KILN_STORAGE__S3__ADDRESSING_STYLE": "path",
    }


@pytest.fixture(scope="module")
def kiln_db(db: str) -> str:
    return db


@pytest.fixture(scope="module")
def kiln_env(s3_endpoint: str, bucket: str) -> dict[str, str]:
    return {**s3_env(s3_endpoint, bucket, "redirect"),
            "KILN_WORKER__RETRY_BASE_SECONDS": str(RETRY_BASE_SECONDS),
            "KILN_WORKER__MAX_ATTEMPTS": "3"}


def bucket_keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def build(kiln: KilnProcesses, body: dict[str, Any]) -> dict[str, Any]:
    resp = kiln.post_build(body)
    assert resp.status_code in (200, 202), resp.text
    final = kiln.wait_build(resp.json()["key"])
    assert final["state"] == "succeeded", final
    return final


def test_download_redirects_to_a_presigned_url(kiln: KilnProcesses, s3: Any, bucket: str,
                                               s3_endpoint: str) -> None:
    final = build(kiln, {"os": "linux", "arch": "amd64", "plugins": [f"{gp.HELLO}@v0.1.0"]})
    key, artifact = final["key"], final["artifact"]
    url = f"{kiln.url}/api/builds/{key}/artifact"

    answer = requests.get(url, allow_redirects=False, timeout=30)
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location.startswith(f"{s3_endpoint}/{bucket}/builds/{key[:2]}/{key}/")
    assert answer.headers["Cache-Control"] == "no-store"

    direct = requests.get(location, timeout=60)
    assert direct.status_code == 200
    assert hashlib.sha256(direct.content).hexdigest() == artifact["sha256"]
    assert len(direct.content) == artifact["size"]
    assert direct.content[:4] == b"\x7fELF"
    assert direct.headers["Content-Disposition"] == \
        'attachment; filename="caddy_linux_amd64_custom"'

    followed = requests.get(url, timeout=60)  # what curl -L or a browser does
    assert [r.status_code for r in followed.history] == [302]
    assert followed.content == direct.content

    # published at its content-addressed key (beside the build's other files, such as
    # checksums and signatures); no temporary upload left behind
    keys = bucket_keys(s3, bucket)
    assert f"builds/{key[:2]}/{key}/caddy_linux_amd64_custom" in keys
    assert all(k.startswith(f"builds/{key[:2]}/{key}/") for k in keys), keys


def test_stream_mode_serves_from_s3_with_ranges(kiln: KilnProcesses, tmp_path: Path,
                                                s3_endpoint: str, bucket: str) -> None:
    final = build(kiln, {"os": "linux", "arch": "amd64", "plugins": [f"{gp.HELLO}@v0.1.0"]})
    streaming = KilnProcesses(db_url=kiln.env["KILN_DATABASE__URL"], root=tmp_path,
                              goproxy=kiln.env["KILN_BUILD__GOPROXY"], cache_dir=tmp_path,
                              env=s3_env(s3_endpoint, bucket, "stream"))
    try:
        streaming.start_api()
        url = f"{streaming.url}/api/builds/{final['key']}/artifact"
        whole = requests.get(url, allow_redirects=False, timeout=60)
        assert whole.status_code == 200
        assert hashlib.sha256(whole.content).hexdigest() == final["artifact"]["sha256"]
        assert whole.headers["Content-Disposition"] == \
            'attachment; filename="caddy_linux_amd64_custom"'
        middle = final["artifact"]["size"] // 2
        part = requests.get(url, headers={"Range": f"bytes={middle}-{middle + 99}"}, timeout=30)
        assert part.status_code == 206
        assert part.content == whole.content[middle:middle + 100]
    finally:
        streaming.close()


def wait_first_failure(kiln: KilnProcesses, key: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = requests.get(f"{kiln.url}/api/builds/{key}", timeout=10).json()
        if doc["error"] or doc["state"] in ("succeeded", "failed"):
            return dict(doc)
        time.sleep(0.05)
    raise AssertionError(f"build {key} never failed; worker log:\n{kiln.log('worker')[-4000:]}")


def test_storage_outage_publishes_nothing_and_is_retried(kiln: KilnProcesses, s3: Any,
                                                         bucket: str) -> None:
    # the bucket goes away (an outage, a mistaken deletion) while the worker is running
    for name in bucket_keys(s3, bucket):
        s3.delete_object(Bucket=bucket, Key=name)
    s3.delete_bucket(Bucket=bucket)
    resp = kiln.post_build({"os": "linux", "arch": "arm64", "plugins": [f"{gp.HELLO}@v0.1.0"]})
    key = resp.json()["key"]

    doc = wait_first_failure(kiln, key)
    assert doc["state"] == "queued", doc  # handed back for a retry, not failed for good
    assert doc["retryable"] is True
    assert "StorageError" in doc["error"] and "NoSuchBucket" in doc["error"]
    assert "artifact" not in doc
    assert requests.get(f"{kiln.url}/api/builds/{key}/artifact",
                        allow_redirects=False, timeout=10).status_code == 404

    s3.create_bucket(Bucket=bucket)  # the store is back
    assert bucket_keys(s3, bucket) == []
    final = kiln.wait_build(key)
    assert final["state"] == "succeeded", final
    assert final["attempts"] >= 2
    assert final["attempt_history"][0]["outcome"] == "failed"
    assert "NoSuchBucket" in final["attempt_history"][0]["error"]
    body = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=60).content
    assert hashlib.sha256(body).hexdigest() == final["artifact"]["sha256"]
