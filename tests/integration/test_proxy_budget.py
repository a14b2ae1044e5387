"""What a client sees when a request needs too many module-proxy look-ups, or the proxy hangs:
the API wired from its config on a real PostgreSQL, against a real HTTP module proxy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from kiln.config import load_config
from kiln.wiring import Services
from tests.unit.test_proxy_budget import CADDY_VERSION, FakeProxy, serving

PLATFORM = {"os": "linux", "arch": "amd64", "caddy_version": CADDY_VERSION}


@pytest.fixture
def fake_proxy() -> Iterator[FakeProxy]:
    """A module proxy with every github.com/acme/p<N> at v1.0.0 that counts what it is asked."""
    with serving() as proxy:
        yield proxy


@contextmanager
def api(db_url: str, proxy: FakeProxy, tmp_path: Path,
        **build: Any) -> Iterator[tuple[testing.TestClient, Services]]:
    """Yield a client of the API configured as a deployment would be (build.* settings)."""
    from kiln.api.app import create_app
    from kiln.wiring import make_services

    env = {"CONFIG_PATH": "/dev/null", "KILN_DATABASE__URL": db_url,
           "KILN_STORAGE__LOCAL__PATH": str(tmp_path / "store"),
           "KILN_BUILD__GOPROXY": proxy.url, "KILN_BUILD__GOSUMDB": "off"}
    env.update({f"KILN_BUILD__{name.upper()}": str(value) for name, value in build.items()})
    services = make_services(load_config(env=env))
    services.queue.register_worker("w1", hostname="h", pid=1, concurrency=1,
                                   sandbox="process", go_version="go1.25.0")
    try:
        yield testing.TestClient(create_app(services)), services
    finally:
        if services.metrics is not None:
            services.metrics.stop()
        services.queue.pool.close()


def plugins(numbers: range, version: str = "") -> list[str]:
    return [f"github.com/acme/p{n}" + (f"@{version}" if version else "") for n in numbers]


def test_a_build_needing_too_many_look_ups_is_a_400_that_says_so(
        db_url: str, fake_proxy: FakeProxy, tmp_path: Path) -> None:
    with api(db_url, fake_proxy, tmp_path, max_proxy_calls=10) as (client, services):
        # Caddy (1) and 10 plugins at latest (a list and a go.mod each): 21 look-ups
        resp = client.simulate_post("/api/builds",
                                    json={**PLATFORM, "plugins": plugins(range(10))})
        assert resp.status_code == 400, resp.text
        message = resp.json["error"]["message"]
        assert message.startswith("this request needs more than 10 module-proxy look-ups")
        assert "fewer plugins" in message
        assert fake_proxy.count() <= 10
        # nothing was queued
        assert client.simulate_get("/api/builds").json["builds"] == []


def test_a_made_up_package_path_is_a_400_not_a_storm_of_look_ups(
        db_url: str, fake_proxy: FakeProxy, tmp_path: Path) -> None:
    with api(db_url, fake_proxy, tmp_path, max_proxy_calls=7) as (client, _):
        resp = client.simulate_get("/api/plugin-versions",
                                   params={"path": "github.com/nobody/a/b/c/d/e"})
        assert resp.status_code == 400, resp.text
        assert "more than 7 module-proxy look-ups" in resp.json["error"]["message"]
        assert fake_proxy.count() == 7
        # a real plugin still answers, on a budget of its own
        found = client.simulate_get("/api/plugin-versions", params={"path": "github.com/acme/p1"})
        assert found.status_code == 200 and found.json["versions"] == ["v1.0.0"]


def test_a_hanging_proxy_is_a_503_with_retry_after_within_the_deadline(
        db_url: str, fake_proxy: FakeProxy, tmp_path: Path) -> None:
    deadline = 2.0
    with api(db_url, fake_proxy, tmp_path, proxy_deadline=deadline,
             proxy_timeout=60) as (client, _):
        fake_proxy.hang = True
        for route, kwargs in (
                ("/api/plugin-versions", {"params": {"path": "github.com/acme/p1"}}),
                ("/api/versions", {"params": {"module": "github.com/acme/p2"}})):
            fake_proxy.closed.clear()
            started = time.monotonic()
            resp = client.simulate_get(route, **kwargs)
            elapsed = time.monotonic() - started
            assert resp.status_code == 503, resp.text
            assert int(resp.headers["Retry-After"]) > 0
            assert resp.json["error"]["message"] == (
                "the Go module proxy did not answer within 2 s: try again shortly")
            # Kiln hung up on the proxy rather than leaving the call open
            assert fake_proxy.closed.wait(10)
            assert elapsed < 3 * deadline  # generous: one call alone could take 60 s
        fake_proxy.closed.clear()
        resp = client.simulate_post("/api/builds",
                                    json={**PLATFORM, "plugins": plugins(range(3))})
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        assert fake_proxy.closed.wait(10)


def test_a_build_of_many_cached_plugins_is_not_limited(
        db_url: str, fake_proxy: FakeProxy, tmp_path: Path) -> None:
    with api(db_url, fake_proxy, tmp_path, max_proxy_calls=6) as (client, _):
        # 20 plugins, resolved four at a time: each request needs at most 5 look-ups
        for start in range(0, 20, 4):
            resp = client.simulate_post("/api/builds", json={
                **PLATFORM, "plugins": plugins(range(start, start + 4), "v1.0.0")})
            assert resp.status_code == 202, resp.text
    asked = fake_proxy.count()
    # another API process: its memory is empty, the resolutions are in PostgreSQL
    with api(db_url, fake_proxy, tmp_path, max_proxy_calls=6) as (client, _):
        resp = client.simulate_post("/api/builds", json={
            **PLATFORM, "plugins": plugins(range(20), "v1.0.0")})
        assert resp.status_code == 202, resp.text
        assert [p["version"] for p in resp.json["plugins"]] == ["v1.0.0"] * 20
    assert fake_proxy.count() == asked
