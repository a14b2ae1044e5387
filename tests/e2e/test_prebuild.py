"""Builds ready before anyone asks, end to end: a running API and worker, the janitor's
``prebuild`` job run as a deployment runs it (``python -m functions.janitor --once``), and
the synthetic module proxy publishing a Caddy release.

A user builds and downloads a configuration; Caddy releases; the janitor queues that
configuration on the release and the worker builds it; the user's next request for it is
answered from the store (200, not 202) with the new Caddy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

#: build.latest_ttl: a release is seen this long after it is published
LATEST_TTL = 1.0
NEW_CADDY = "v2.8.9"
BODY = {"os": "linux", "arch": "amd64", "plugins": [gp.HELLO]}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a proxy tree of the module's own: the test publishes a release into it."""
    return gp.generate(tmp_path_factory.mktemp("prebuild-proxy"))


@pytest.fixture(scope="module")
def kiln_goproxy(proxy: Path) -> str:
    return f"file://{proxy}"


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_BUILD__LATEST_TTL": str(LATEST_TTL),
            "KILN_JANITOR__PREBUILD__ENABLED": "true",
            "KILN_JANITOR__PREBUILD__TOP": "5"}


def run_prebuild(kiln: KilnProcesses) -> None:
    """Run the janitor's prebuild job once, as a scheduled function does."""
    proc = kiln.start_janitor("prebuild", args=["--once", "--job", "prebuild"])
    assert proc.wait(120) == 0, kiln.log("prebuild")[-4000:]


def prebuilt(kiln: KilnProcesses) -> list[str]:
    with psycopg.connect(kiln.db_url) as conn:
        rows = conn.execute("SELECT key FROM kiln_builds WHERE requested_by = 'prebuild'")
        return [r[0] for r in rows.fetchall()]


def prebuild_counts(kiln: KilnProcesses) -> dict[str, float]:
    text = requests.get(kiln.url + "/metrics", timeout=30).text
    return {s.labels["result"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "kiln_prebuilds_total"}


def test_after_a_release_the_first_request_is_answered_from_the_store(
        kiln: KilnProcesses, proxy: Path, tmp_path: Path) -> None:
    first = kiln.post_build(BODY)
    assert first.status_code == 202, first.text
    doc: dict[str, Any] = kiln.wait_build(first.json()["key"])
    assert doc["state"] == "succeeded", doc
    assert doc["caddy_version"] == gp.CADDY_LATEST
    kiln.download(doc, tmp_path / "caddy")  # a download makes the configuration popular

    run_prebuild(kiln)  # the first look records what "latest" is
    assert prebuilt(kiln) == []

    gp.publish(proxy, gp.CADDY, NEW_CADDY)
    time.sleep(LATEST_TTL + 0.5)  # until the API's cached "latest" has expired too
    run_prebuild(kiln)
    [key] = prebuilt(kiln)
    built = kiln.wait_build(key)
    assert built["state"] == "succeeded", built

    # the user asks after the release: the build is there already
    again = kiln.post_build(BODY)
    assert again.status_code == 200, again.text
    assert again.json()["key"] == key != first.json()["key"]
    assert again.json()["caddy_version"] == NEW_CADDY
    assert prebuild_counts(kiln) == {"queued": 1.0}

    run_prebuild(kiln)  # nothing released since: nothing more
    assert prebuilt(kiln) == [key]
