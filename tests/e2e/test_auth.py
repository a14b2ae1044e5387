"""API keys end to end: `kiln keys`, bearer tokens on every guarded route, both auth modes.

Two gunicorns share one database: one in ``auth.mode: keys``, one in ``open``. A worker row
is registered so that build keys can be made, but no worker runs (builds stay queued) except
while the ``built`` fixture has a real one build what the tests that need a binary use.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg_pool import ConnectionPool

from kiln.api.service import TOOLCHAIN_CACHE_SECONDS
from kiln.db.builds import QueueManager
from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses
from tests.service import template_database as _database

pytestmark = pytest.mark.slow

FAKE_WORKER = "auth-test-registered"


@dataclass
class Kiln:
    keys_mode: KilnProcesses
    open_mode: KilnProcesses
    db_url: str
    tokens: dict[str, str]

    def kiln(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the kiln command against this database."""
        return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO,
                              env=self.keys_mode.env, capture_output=True, text=True,
                              timeout=60, check=False)


@pytest.fixture(scope="module")
def kilns(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
         proxy_dir: Path, go_cache_dir: Path) -> Iterator[Kiln]:
    url = _database(pg_server_url, pg_template, "kiln_auth")
    with ConnectionPool(url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        QueueManager(pool).register_worker(FAKE_WORKER, hostname="nowhere", pid=1,
                                           concurrency=1, sandbox="process:go-registered",
                                           go_version="go1.27.3")
    root = tmp_path_factory.mktemp("auth")
    common = {"root": root, "goproxy": f"file://{proxy_dir}", "cache_dir": go_cache_dir}
    keys_mode = KilnProcesses(db_url=url, **common, env={"KILN_AUTH__MODE": "keys"})
    open_mode = KilnProcesses(db_url=url, **common, env={"KILN_AUTH__MODE": "open"})
    open_mode.logs = root / "logs-open"
    open_mode.logs.mkdir()
    kiln = Kiln(keys_mode, open_mode, url, {})
    try:
        keys_mode.start_api()
        open_mode.start_api()
        for name, scope, extra in [("ops", "admin", []), ("ci", "build", []),
                                   ("other", "build", []), ("gone", "build", []),
                                   ("urgent", "build", ["--priority", "5"])]:
            made = kiln.kiln("keys", "create", name, "--scope", scope, "--json", *extra)
            assert made.returncode == 0, made.stderr
            kiln.tokens[name] = json.loads(made.stdout)["token"]
        assert kiln.kiln("keys", "revoke", "gone").returncode == 0
        yield kiln
    finally:
        keys_mode.close()
        open_mode.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_build(base: str, body: dict[str, Any], token: str | None = None) -> requests.Response:
    return requests.post(f"{base}/api/builds", json=body,
                         headers=bearer(token) if token else {}, timeout=60)


def _bodies() -> Iterator[dict[str, Any]]:
    for plugins in ([], [f"{gp.HELLO}@v0.1.0"], [f"{gp.HELLO}@v0.2.0"]):
        for version in gp.CADDY_RELEASES:
            for arch in ("arm64", "386", "riscv64", "s390x", "ppc64le", "mips", "mipsle",
                         "mips64", "mips64le", "ppc64", "loong64"):
                yield {"os": "linux", "arch": arch, "caddy_version": version,
                       "plugins": plugins}


_fresh = _bodies()


def new_build(kilns: Kiln, token: str | None = "ci") -> str:
    """Queue a build nobody asked for yet (as key ``token``, or anonymously); return its key."""
    body = next(_fresh)
    if token is None:
        resp = post_build(kilns.open_mode.url, body)
    else:
        resp = post_build(kilns.keys_mode.url, body, kilns.tokens[token])
    assert resp.status_code == 202, resp.text
    return str(resp.json()["key"])


#: what a real worker builds once for the module, by name (linux/amd64: new_build's bodies
#: never ask for it, so none of them is keyed the same)
BUILT = {
    "deleted": {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST},
    "scopes": {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
               "plugins": [f"{gp.HELLO}@v0.1.0"]},
    "download": {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
                 "plugins": [f"{gp.HELLO}@v0.2.0"]},
}


@pytest.fixture(scope="module")
def built(kilns: Kiln) -> dict[str, str]:
    """Build BUILT with a real worker, then stop it; return each build's key by name."""
    service = kilns.keys_mode
    admin = bearer(kilns.tokens["ops"])
    # an operator clears the queue before a worker starts: only these builds run
    queued = requests.get(f"{service.url}/api/admin/builds",
                          params={"state": "queued", "limit": 500}, headers=admin,
                          timeout=30).json()["builds"]
    for build in queued:
        cancelled = requests.delete(f"{service.url}/api/builds/{build['key']}", headers=admin,
                                    timeout=30)
        assert cancelled.status_code == 200, cancelled.text
    # the stand-in leaves: once the real worker stops too, new builds are keyed with the
    # toolchain of the most recently started worker, the real one's, and stay queued
    with ConnectionPool(kilns.db_url, min_size=1, max_size=1,
                        kwargs={"autocommit": True}) as pool:
        QueueManager(pool).set_worker_state(FAKE_WORKER, "gone")
    service.start_worker(env={"KILN_WORKER__CONCURRENCY": "1"})
    try:
        service.wait_for_worker()
        # a worker claims only builds keyed with its own toolchain: wait until the API keys
        # new builds with the real worker's, not the registered stand-in's it cached
        time.sleep(TOOLCHAIN_CACHE_SECONDS + 0.5)
        keys = {}
        for name, body in BUILT.items():
            posted = post_build(service.url, body, kilns.tokens["ci"])
            assert posted.status_code == 202, posted.text
            keys[name] = str(posted.json()["key"])
        for key in keys.values():
            final = service.wait_build(key)
            assert final["state"] == "succeeded", final
    finally:
        service.stop("worker")
    return keys


# -- kiln keys ----------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_listed_without_tokens(kilns: Kiln) -> None:
    listed = kilns.kiln("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    live = {k["name"]: k for k in json.loads(listed.stdout)}
    assert set(live) == {"ops", "ci", "other", "urgent"}
    assert live["ops"]["scope"] == "admin" and live["urgent"]["priority"] == 5
    assert not any("token" in k for k in live.values())
    every = {k["name"]: k for k in json.loads(kilns.kiln("keys", "list", "--all", "--json").stdout)}
    assert every["gone"]["revoked_at"] is not None
    with psycopg.connect(kilns.db_url) as conn:
        rows = conn.execute("SELECT * FROM kiln_api_keys").fetchall()
        stored = conn.execute("SELECT token_sha256 FROM kiln_api_keys WHERE name = 'ci'"
                              ).fetchone()
    for token in kilns.tokens.values():
        assert token not in repr(rows)
    assert stored is not None
    assert stored[0] == hashlib.sha256(kilns.tokens["ci"].encode()).hexdigest()
    table = kilns.kiln("keys", "list").stdout
    assert "ops" in table and "admin" in table and "gone" not in table


def test_keys_command_explains_mistakes(kilns: Kiln) -> None:
    dup = kilns.kiln("keys", "create", "ci")
    assert dup.returncode == 1 and "revoke it first" in dup.stderr
    bad = kilns.kiln("keys", "create", "no spaces")
    assert bad.returncode == 1 and "not a key name" in bad.stderr
    missing = kilns.kiln("keys", "revoke", "nobody")
    assert missing.returncode == 1 and "kiln keys list" in missing.stderr
    human = kilns.kiln("keys", "create", "shown-once")
    assert human.returncode == 0 and "shown only now" in human.stdout
    assert kilns.kiln("keys", "revoke", "shown-once").returncode == 0


# -- every guarded route --------------------------------------------------------------------

#: (method, path template, what it needs in keys mode, an admin's answer once the build it
#: names is in the state the route acts on: see ``ready_build``)
GUARDED = [
    ("POST", "/api/builds", "build", 202),
    ("DELETE", "/api/builds/{key}", "key", 200),
    ("GET", "/api/admin/builds", "admin", 200),
    ("POST", "/api/admin/builds/{key}/rebuild", "admin", 202),
    ("GET", "/api/admin/workers", "admin", 200),
    ("DELETE", "/api/admin/builds/{key}/artifact", "admin", 200),
]


def ready_build(kilns: Kiln, template: str, built: dict[str, str]) -> str | None:
    """Return a build ``template`` can act on: finished for a rebuild, stored for a delete."""
    if template == "/api/admin/builds/{key}/rebuild":
        key = new_build(kilns)
        cancelled = requests.delete(f"{kilns.keys_mode.url}/api/builds/{key}",
                                    headers=bearer(kilns.tokens["ops"]), timeout=30)
        assert cancelled.status_code == 200, cancelled.text
        return key
    if template == "/api/admin/builds/{key}/artifact":
        return built["scopes"]
    return None  # a new queued build (call() makes it), or no build at all


def call(kilns: Kiln, method: str, template: str, headers: dict[str, str],
         base: str | None = None, key: str | None = None) -> requests.Response:
    """Call a route; routes of one build get a new build unless ``key`` is given."""
    if "{key}" in template and key is None:
        key = new_build(kilns)
    body = next(_fresh) if template == "/api/builds" else None
    return requests.request(method, (base or kilns.keys_mode.url) + template.format(key=key),
                            json=body, headers=headers, timeout=60)


def assert_error(resp: requests.Response, status: int) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status_code"] == status
    assert body["error"]["message"] and body["error"]["id"] == resp.headers["X-Request-Id"]
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="kiln"')


@pytest.mark.parametrize(("method", "template", "need", "admin_status"), GUARDED)
def test_without_a_valid_key_the_answer_is_401(kilns: Kiln, method: str, template: str,
                                               need: str, admin_status: int) -> None:
    wrong = "kiln_" + "x" * 43
    key = new_build(kilns) if "{key}" in template else None
    for headers in ({}, bearer(wrong), bearer(kilns.tokens["gone"]),
                    {"Authorization": "Basic b3BzOm9wcw=="}, {"Authorization": "Bearer"}):
        resp = call(kilns, method, template, headers, key=key)
        assert_error(resp, 401)
        if headers and headers["Authorization"].startswith("Bearer kiln_"):
            assert "not valid" in resp.json()["error"]["message"]


@pytest.mark.parametrize(("method", "template", "need", "admin_status"), GUARDED)
def test_scopes_decide_between_403_and_success(kilns: Kiln, built: dict[str, str],
                                               method: str, template: str, need: str,
                                               admin_status: int) -> None:
    as_builder = call(kilns, method, template, bearer(kilns.tokens["ci"]),
                      key=ready_build(kilns, template, built))
    if need == "admin":
        assert_error(as_builder, 403)
        assert "admin" in as_builder.json()["error"]["message"]
    else:
        # a builder may do what an admin may on a build it asked for
        assert as_builder.status_code == admin_status, as_builder.text
    # an admin key may do everything: given a build in the state the route acts on, the
    # answer is the route's success, never a 409
    as_admin = call(kilns, method, template, bearer(kilns.tokens["ops"]),
                    key=ready_build(kilns, template, built))
    assert as_admin.status_code == admin_status, as_admin.text
    if template == "/api/builds/{key}":
        assert as_admin.json()["state"] == "cancelled"
    if template == "/api/admin/builds/{key}/artifact":
        assert "artifact" not in as_admin.json()
        gone = requests.head(f"{kilns.keys_mode.url}/api/builds/{built['scopes']}/artifact",
                             timeout=30)
        assert gone.status_code == 404
    if template == "/api/admin/builds/{key}/rebuild":
        assert as_admin.json()["state"] == "queued"


def test_open_mode_builds_anonymously_but_guards_the_rest(kilns: Kiln) -> None:
    for method, template, need, _admin_status in GUARDED:
        resp = call(kilns, method, template, {}, base=kilns.open_mode.url)
        if need == "build":
            assert resp.status_code == 202, resp.text
        else:
            assert_error(resp, 401)
    # a key sent in open mode must still be valid
    wrong = post_build(kilns.open_mode.url, {"os": "linux", "arch": "amd64"}, "kiln_nope")
    assert_error(wrong, 401)


def test_public_routes_need_no_key(kilns: Kiln) -> None:
    key = new_build(kilns)
    for path in ("/healthz", f"/api/builds/{key}", "/metrics", "/openapi.json"):
        assert requests.get(kilns.keys_mode.url + path, timeout=30).status_code == 200, path


# -- who may cancel ----------------------------------------------------------------------


def test_only_the_requester_or_an_admin_cancels(kilns: Kiln) -> None:
    mine = new_build(kilns, "ci")
    url = f"{kilns.keys_mode.url}/api/builds/{mine}"
    refused = requests.delete(url, headers=bearer(kilns.tokens["other"]), timeout=30)
    assert_error(refused, 403)
    assert "did not ask for" in refused.json()["error"]["message"]
    done = requests.delete(url, headers=bearer(kilns.tokens["ci"]), timeout=30)
    assert done.status_code == 200 and done.json()["state"] == "cancelled"
    assert "cancelled by key ci" in done.json()["error"]
    # cancelling twice is harmless
    assert requests.delete(url, headers=bearer(kilns.tokens["ci"]), timeout=30).status_code == 200

    anonymous = new_build(kilns, None)
    url = f"{kilns.keys_mode.url}/api/builds/{anonymous}"
    assert_error(requests.delete(url, headers=bearer(kilns.tokens["ci"]), timeout=30), 403)
    by_admin = requests.delete(url, headers=bearer(kilns.tokens["ops"]), timeout=30)
    assert by_admin.status_code == 200 and by_admin.json()["state"] == "cancelled"
    missing = requests.delete(f"{kilns.keys_mode.url}/api/builds/{'e' * 64}",
                              headers=bearer(kilns.tokens["ops"]), timeout=30)
    assert_error(missing, 404)


def test_admin_lists_builds_with_requesters_and_rebuilds(kilns: Kiln) -> None:
    mine = new_build(kilns, "ci")
    theirs = new_build(kilns, None)
    headers = bearer(kilns.tokens["ops"])
    listing = requests.get(f"{kilns.keys_mode.url}/api/admin/builds", params={"limit": 500},
                           headers=headers, timeout=30).json()["builds"]
    by_key = {b["key"]: b for b in listing}
    assert by_key[mine]["requested_by"]["key_name"] == "ci"
    assert by_key[theirs]["requested_by"]["anonymous"] is True
    assert by_key[theirs]["requested_by"]["id"] == "addr:127.0.0.1"
    only_ci = requests.get(f"{kilns.keys_mode.url}/api/admin/builds",
                           params={"requested_by": by_key[mine]["requested_by"]["id"]},
                           headers=headers, timeout=30).json()["builds"]
    assert only_ci and all(b["requested_by"]["key_name"] == "ci" for b in only_ci)
    bad = requests.get(f"{kilns.keys_mode.url}/api/admin/builds", params={"state": "asleep"},
                       headers=headers, timeout=30)
    assert_error(bad, 400)

    # a queued build cannot be forced again; a cancelled one can
    rebuild = f"{kilns.keys_mode.url}/api/admin/builds/{mine}/rebuild"
    assert_error(requests.post(rebuild, headers=headers, timeout=30), 409)
    requests.delete(f"{kilns.keys_mode.url}/api/builds/{mine}", headers=headers, timeout=30)
    again = requests.post(rebuild, headers=headers, timeout=30)
    assert again.status_code == 202 and again.json()["state"] == "queued"

    workers = requests.get(f"{kilns.keys_mode.url}/api/admin/workers", headers=headers,
                           timeout=30).json()["workers"]
    assert FAKE_WORKER in {w["id"] for w in workers}


def test_a_keys_priority_puts_its_builds_first(kilns: Kiln) -> None:
    earlier = new_build(kilns, "ci")
    urgent = new_build(kilns, "urgent")
    status = requests.get(f"{kilns.keys_mode.url}/api/builds/{urgent}", timeout=30).json()
    behind = requests.get(f"{kilns.keys_mode.url}/api/builds/{earlier}", timeout=30).json()
    assert status["queue_position"] == 0
    assert behind["queue_position"] > 0


# -- deleting an artifact -------------------------------------------------------------------


def test_admin_deletes_an_artifact_and_the_next_request_rebuilds(kilns: Kiln,
                                                                  built: dict[str, str]) -> None:
    service = kilns.keys_mode
    key, body = built["deleted"], BUILT["deleted"]
    artifact = f"{service.url}/api/builds/{key}/artifact"
    assert requests.head(artifact, timeout=30).status_code == 200
    gone = requests.delete(f"{service.url}/api/admin/builds/{key}/artifact",
                           headers=bearer(kilns.tokens["ops"]), timeout=30)
    assert gone.status_code == 200 and "artifact" not in gone.json()
    assert requests.head(artifact, timeout=30).status_code == 404
    assert not list((service.root / "artifacts").rglob(f"*{key}*/*"))
    twice = requests.delete(f"{service.url}/api/admin/builds/{key}/artifact",
                            headers=bearer(kilns.tokens["ops"]), timeout=30)
    assert_error(twice, 409)
    # asked for again, it is built again
    again = post_build(service.url, body, kilns.tokens["ci"])
    assert again.status_code == 202 and again.json()["state"] == "queued"


def test_download_in_keys_mode_needs_a_build_key(kilns: Kiln, built: dict[str, str]) -> None:
    """caddyserver.com's download route starts builds: in keys mode it wants a key too."""
    service = kilns.keys_mode
    url = service.url + "/api/download"
    params = {"os": "linux", "arch": "amd64", "version": gp.CADDY_OLDEST,
              "p": f"{gp.HELLO}@v0.2.0"}
    anonymous = requests.get(url, params=params, timeout=60)
    assert_error(anonymous, 401)
    assert anonymous.json()["error"]["message"] == (
        "Building needs an API key on this server: send it as 'Authorization: Bearer <token>'")
    looked = requests.head(url, params=params, timeout=60)
    assert looked.status_code == 401 and looked.headers["WWW-Authenticate"].startswith("Bearer")
    for token in ("kiln_" + "x" * 43, kilns.tokens["gone"]):
        refused = requests.get(url, params=params, headers=bearer(token), timeout=60)
        assert_error(refused, 401)
        assert "not valid" in refused.json()["error"]["message"]
    status = requests.get(f"{service.url}/api/builds/{built['download']}", timeout=30).json()
    served = requests.get(url, params=params, headers=bearer(kilns.tokens["ci"]), timeout=120)
    assert served.status_code == 200, served.text
    assert served.headers["X-Kiln-Build-Key"] == built["download"]
    assert served.headers["Content-Disposition"] == \
        'attachment; filename="caddy_linux_amd64_custom"'
    assert hashlib.sha256(served.content).hexdigest() == status["artifact"]["sha256"]
    # the same request in open mode needs no key
    anyone = requests.get(kilns.open_mode.url + "/api/download", params=params, timeout=120)
    assert anyone.status_code == 200, anyone.text
    assert anyone.content == served.content


def test_private_metrics_need_an_admin_key(kilns: Kiln) -> None:
    from falcon import testing

    from kiln.api.app import create_app
    from kiln.config import load_config
    from kiln.wiring import make_services

    config = load_config("/dev/null", env={"KILN_DATABASE__URL": kilns.db_url,
                                           "KILN_METRICS__PUBLIC": "false"})
    services = make_services(config)
    try:
        client = testing.TestClient(create_app(services))
        assert client.simulate_get("/metrics").status_code == 401
        as_builder = client.simulate_get("/metrics", headers=bearer(kilns.tokens["ci"]))
        assert as_builder.status_code == 403
        as_admin = client.simulate_get("/metrics", headers=bearer(kilns.tokens["ops"]))
        assert as_admin.status_code == 200 and "kiln_builds" in as_admin.text
        spec = client.simulate_get("/openapi.json").json
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    finally:
        assert services.metrics is not None
        services.metrics.stop()
        services.queue.pool.close()


def test_version_lookups_need_a_key_in_keys_mode(kilns: Kiln) -> None:
    """Each look-up makes Kiln ask the module proxy: no anonymous look-ups in keys mode."""
    for path in ("/api/versions", "/api/plugin-versions?path=github.com/caddy-dns/cloudflare"):
        anonymous = requests.get(kilns.keys_mode.url + path, timeout=60)
        assert_error(anonymous, 401)
        with_key = requests.get(kilns.keys_mode.url + path, timeout=60,
                                headers=bearer(kilns.tokens["ci"]))
        assert with_key.status_code != 401, with_key.text
    assert requests.get(kilns.open_mode.url + "/api/versions", timeout=60).status_code == 200
