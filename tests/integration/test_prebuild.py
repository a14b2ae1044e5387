"""Prebuilds on a real PostgreSQL and the synthetic module proxy: a release is noticed, the
most downloaded configurations are queued on it as a user would ask for them, once.

The job and the user's side are wired from a Config as a deployment wires them
(kiln/wiring.py): the user submits through the API's BuildService with a principal, the job
through the same service without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from kiln.api.principal import Principal
from kiln.api.service import BuildService
from kiln.config import Config, load_config
from kiln.db.builds import Build, QueueManager
from kiln.janitor.prebuild import PREBUILD_PRIORITY, PREBUILD_REQUESTER, Prebuilder
from kiln.metrics import KilnCollector
from kiln.request.spec import BuildRequest
from kiln.wiring import make_build_service, make_janitor, make_prebuilder, make_quota
from tests.fixtures import goproxy as gp

USER = Principal(address="203.0.113.7")
#: a Caddy release the synthetic proxy does not hold until a test publishes it
NEW_CADDY = "v2.8.9"
NEW_HELLO = "v0.3.0"
SANDBOX, GO = "process", "go1.25.0"


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(db_url, min_size=1, max_size=8, kwargs={"autocommit": True}) as p:
        yield p


@pytest.fixture
def proxy(tmp_path: Path) -> Path:
    """A proxy tree of the test's own: the test publishes releases into it."""
    return gp.generate(tmp_path / "proxy")


def configure(db_url: str, proxy: Path, tmp_path: Path, **prebuild: str) -> Config:
    env = {"CONFIG_PATH": "/dev/null", "KILN_DATABASE__URL": db_url,
           "KILN_BUILD__GOPROXY": f"file://{proxy}",
           # "latest" is asked of the proxy each time: a release is seen at once
           "KILN_BUILD__LATEST_TTL": "0",
           "KILN_QUOTA__ANONYMOUS_BUILDS": "100",
           "KILN_STORAGE__LOCAL__PATH": str(tmp_path / "artifacts")}
    env.update({f"KILN_JANITOR__PREBUILD__{k.upper()}": v for k, v in prebuild.items()})
    return load_config(env=env)


@pytest.fixture
def queue(pool: ConnectionPool) -> QueueManager:
    queue = QueueManager(pool)
    queue.register_worker("w1", hostname="h", pid=1, concurrency=1, sandbox=SANDBOX,
                          go_version=GO)
    return queue


def user_service(config: Config, queue: QueueManager) -> BuildService:
    """The service the API builds (quotas on), as kiln/wiring.py make_services does."""
    return make_build_service(config, queue=queue, catalog=None,
                              quota=make_quota(queue.pool, config.quota))


def request(arch: str = "amd64", plugins: tuple[str, ...] = (), os: str = "linux",
            caddy: str | None = None) -> BuildRequest:
    return BuildRequest.create(os=os, arch=arch, plugins=plugins, caddy_version=caddy)


def built_and_downloaded(service: BuildService, queue: QueueManager, req: BuildRequest,
                         downloads: int) -> Build:
    """Ask for a build as a user, build it (a worker's claim and completion), download it."""
    submitted = service.submit(req, principal=USER)
    assert submitted.queued
    claimed = queue.claim("w1", limit=1, lease_seconds=30, sandbox=SANDBOX, go_version=GO)
    assert [c.key for c in claimed] == [submitted.key]
    assert queue.complete(submitted.key, "w1", artifact_path=f"builds/{submitted.key}",
                          artifact_size=1, artifact_sha256="0")
    for _ in range(downloads):
        queue.record_download(submitted.key)
    return submitted.build


def prebuilds(pool: ConnectionPool) -> list[dict[str, Any]]:
    with pool.connection() as conn:
        cur = conn.execute(
            "SELECT key, spec, priority, state FROM kiln_builds WHERE requested_by = %s "
            "ORDER BY key", (PREBUILD_REQUESTER,))
        return [dict(zip(("key", "spec", "priority", "state"), row, strict=True))
                for row in cur.fetchall()]


def configuration(spec: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    return spec["arch"], tuple(p["package"] for p in spec["plugins"])


def quota_used(pool: ConnectionPool) -> int:
    with pool.connection() as conn:
        row = conn.execute("SELECT coalesce(sum(used), 0) FROM kiln_quota_usage").fetchone()
    assert row is not None
    return int(row[0])


def prebuild_counts(pool: ConnectionPool) -> dict[str, float]:
    """Return kiln_prebuilds_total by result, as /metrics shows it."""
    for family in KilnCollector(pool).collect():
        if family.name == "kiln_prebuilds":  # prometheus_client drops _total from the name
            return {s.labels["result"]: s.value for s in family.samples
                    if s.name == "kiln_prebuilds_total"}
    raise AssertionError("no kiln_prebuilds_total in /metrics")


def test_a_caddy_release_queues_the_top_configurations_once_and_users_hit_them(
        pool: ConnectionPool, queue: QueueManager, proxy: Path, db_url: str,
        tmp_path: Path) -> None:
    config = configure(db_url, proxy, tmp_path, enabled="true", top="3")
    users = user_service(config, queue)
    # four configurations on Caddy's latest, by downloads: the top 3 are prebuilt
    built_and_downloaded(users, queue, request("amd64", (gp.HELLO,)), 5)
    built_and_downloaded(users, queue, request("arm64", (gp.HELLO, gp.DNS_PACKAGE)), 3)
    built_and_downloaded(users, queue, request("amd64"), 2)
    built_and_downloaded(users, queue, request("386", (gp.DNS_PACKAGE,)), 1)
    job = make_prebuilder(config, pool)
    assert isinstance(job, Prebuilder)

    assert job.run() == []  # the first look only records what "latest" is
    assert prebuilds(pool) == []

    gp.publish(proxy, gp.CADDY, NEW_CADDY)
    used = quota_used(pool)
    done = job.run()
    assert len(done) == 3 and all(d.startswith("queued ") for d in done), done
    queued = prebuilds(pool)
    assert sorted(configuration(b["spec"]) for b in queued) == sorted([
        ("amd64", (gp.HELLO,)), ("arm64", (gp.DNS_PACKAGE, gp.HELLO)), ("amd64", ())])
    assert {b["spec"]["caddy_version"] for b in queued} == {NEW_CADDY}
    assert {b["priority"] for b in queued} == {PREBUILD_PRIORITY}
    assert {b["state"] for b in queued} == {"queued"}
    assert quota_used(pool) == used  # prebuilds are charged to nobody
    assert prebuild_counts(pool) == {"queued": 3}

    # nothing was released since: the next run queues nothing
    assert job.run() == []
    assert len(prebuilds(pool)) == 3

    # a user asking for one of them afterwards joins that very build, at their priority
    joined = users.submit(request("amd64", (gp.HELLO,)), principal=USER)
    assert not joined.queued
    mine = next(b for b in queued if configuration(b["spec"]) == ("amd64", (gp.HELLO,)))
    assert joined.key == mine["key"]
    assert joined.spec.caddy_version == NEW_CADDY
    assert joined.build.priority == USER.priority > PREBUILD_PRIORITY
    # and once it is built, gets it from the store
    claimed = queue.claim("w1", limit=1, lease_seconds=30, sandbox=SANDBOX, go_version=GO)
    assert [c.key for c in claimed] == [mine["key"]]  # the user's build goes first
    assert queue.complete(mine["key"], "w1", artifact_path="builds/x", artifact_size=1,
                          artifact_sha256="0")
    again = users.submit(request("amd64", (gp.HELLO,)), principal=USER)
    assert (again.key, again.queued, again.build.state) == (mine["key"], False, "succeeded")


def test_a_plugin_release_requeues_the_configurations_that_follow_its_latest(
        pool: ConnectionPool, queue: QueueManager, proxy: Path, db_url: str,
        tmp_path: Path) -> None:
    config = configure(db_url, proxy, tmp_path, enabled="true", top="10")
    users = user_service(config, queue)
    built_and_downloaded(users, queue, request("amd64", (gp.HELLO,)), 2)
    # the same plugin pinned to an old version: its users do not ask for "latest"
    built_and_downloaded(users, queue, request("arm64", (f"{gp.HELLO}@v0.1.0",)), 9)
    built_and_downloaded(users, queue, request("amd64", (gp.DNS_PACKAGE,)), 4)
    job = make_prebuilder(config, pool)
    assert job.run() == []

    gp.publish(proxy, gp.HELLO, NEW_HELLO)
    done = job.run()
    assert len(done) == 1 and done[0].startswith("queued "), done
    [prebuilt] = prebuilds(pool)
    assert configuration(prebuilt["spec"]) == ("amd64", (gp.HELLO,))
    assert prebuilt["spec"]["plugins"][0]["version"] == NEW_HELLO
    assert prebuilt["spec"]["caddy_version"] == gp.CADDY_LATEST
    assert job.run() == []
    latest = users.submit(request("amd64", (gp.HELLO,)), principal=USER)
    assert (latest.key, latest.queued) == (prebuilt["key"], False)


def test_prebuilds_are_off_by_default(pool: ConnectionPool, queue: QueueManager, proxy: Path,
                                      db_url: str, tmp_path: Path) -> None:
    config = configure(db_url, proxy, tmp_path)
    assert config.janitor.prebuild.enabled is False
    users = user_service(config, queue)
    built_and_downloaded(users, queue, request("amd64", (gp.HELLO,)), 3)
    janitor = make_janitor(config, url=db_url)
    try:
        assert "prebuild" not in [job.name for job in janitor.jobs]
        janitor.run_once()
        gp.publish(proxy, gp.CADDY, NEW_CADDY)
        outcomes = janitor.run_once()
    finally:
        janitor.queue.pool.close()
    assert "failed" not in outcomes.values()
    assert prebuilds(pool) == []
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM kiln_builds").fetchone() == (1,)
