"""End to end: gunicorn + a worker process + PostgreSQL + the synthetic module proxy.

A user POSTs a build, polls it, downloads the binary and runs it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import stat
import subprocess
from pathlib import Path

import psycopg
import pytest
import requests

from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses

pytestmark = pytest.mark.slow


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]


def download(kiln: KilnProcesses, key: str, dest: Path) -> Path:
    resp = requests.get(f"{kiln.url}/api/builds/{key}/artifact", timeout=60)
    assert resp.status_code == 200, resp.text
    dest.write_bytes(resp.content)
    dest.chmod(dest.stat().st_mode | stat.S_IXUSR)
    return dest


def modules_of(binary: Path) -> dict[str, str]:
    out = subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and "." in parts[0]:
            found[parts[0]] = parts[1]
    return found


def test_build_download_and_run(kiln: KilnProcesses, tmp_path: Path) -> None:
    # no worker while the build is asked for: it is certainly still queued when its artifact
    # is first requested
    kiln.stop("worker")
    resp = kiln.post_build({
        "os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
        "plugins": [f"{gp.HELLO}@v0.1.0", gp.DNS_PACKAGE],
    })
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    assert doc["state"] == "queued"
    assert resp.headers["Location"].endswith(doc["key"])
    # the request is resolved before it is queued: latest became an absolute version
    assert {p["package"]: p["version"] for p in doc["plugins"]} == {
        gp.HELLO: "v0.1.0", gp.DNS_PACKAGE: gp.DNS_LATEST}
    assert {p["module"] for p in doc["plugins"]} == {gp.HELLO, gp.DNS}
    # not there yet: a 404 that says why, never a partial binary
    early = requests.get(f"{kiln.url}/api/builds/{doc['key']}/artifact", timeout=10)
    assert early.status_code == 404, early.text
    assert early.headers["Content-Type"].startswith("application/json")
    assert early.json()["error"]["message"] == (
        f"build {doc['key']} is queued; the artifact exists once it has succeeded")

    kiln.start_worker("worker-spine")
    kiln.wait_for_worker("worker-spine")
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 1
    assert final["artifact"]["filename"] == "caddy_linux_amd64_custom"

    binary = download(kiln, doc["key"], tmp_path / "caddy")
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == final["artifact"]["sha256"]
    modules = modules_of(binary)
    standard = set(gp.STANDARD_MODULES)
    assert set(modules) - standard == {gp.HELLO_ID, gp.DNS_ID}
    assert modules[gp.HELLO_ID] == "v0.1.0"
    assert modules[gp.DNS_ID] == gp.DNS_LATEST
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert version.startswith("v2.8.0")

    # asking again is served from the store at once
    again = kiln.post_build({
        "os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
        "plugins": [gp.DNS_PACKAGE, f"{gp.HELLO}@v0.1.0"],
    })
    assert again.status_code == 200 and again.json()["key"] == doc["key"]


def test_artifact_headers_and_ranges(kiln: KilnProcesses) -> None:
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST}).json()
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "succeeded", final
    url = f"{kiln.url}/api/builds/{doc['key']}/artifact"
    whole = requests.get(url, timeout=30)
    assert whole.headers["Content-Type"] == "application/octet-stream"
    assert whole.headers["Content-Disposition"] == 'attachment; filename="caddy_linux_amd64_custom"'
    assert whole.headers["ETag"] == f'"{final["artifact"]["sha256"]}"'
    assert int(whole.headers["Content-Length"]) == final["artifact"]["size"]
    part = requests.get(url, headers={"Range": "bytes=0-3"}, timeout=30)
    assert part.status_code == 206 and part.content == b"\x7fELF"
    size = final["artifact"]["size"]
    assert part.headers["Content-Range"] == f"bytes 0-3/{size}"
    tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    beyond = requests.get(url, headers={"Range": f"bytes={size + 5}-"}, timeout=30)
    assert beyond.status_code == 416
    cached = requests.get(url, headers={"If-None-Match": whole.headers["ETag"]}, timeout=30)
    assert cached.status_code == 304 and cached.content == b""


def test_identical_concurrent_posts_make_one_build(kiln: KilnProcesses) -> None:
    body = {"os": "linux", "arch": "arm64", "plugins": [f"{gp.HELLO}@v0.2.0"]}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: kiln.post_build(body), range(20)))
    keys = {r.json()["key"] for r in responses}
    assert all(r.status_code in (200, 202) for r in responses)
    assert len(keys) == 1
    key = keys.pop()
    final = kiln.wait_build(key)
    assert final["state"] == "succeeded", final
    db = kiln.env["KILN_DATABASE__URL"]
    assert count(db, f"SELECT count(*) FROM kiln_builds WHERE key = '{key}'") == 1
    assert count(db, f"SELECT count(*) FROM kiln_attempts WHERE build_key = '{key}'") == 1
    assert final["caddy_version"] == gp.CADDY_LATEST  # "latest" skipped the prerelease


def test_unknown_module_is_refused_before_queueing(kiln: KilnProcesses) -> None:
    before = count(kiln.env["KILN_DATABASE__URL"], "SELECT count(*) FROM kiln_builds")
    resp = kiln.post_build({"os": "linux", "arch": "amd64",
                            "plugins": ["github.com/kiln-fixtures/nosuchplugin"]})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "github.com/kiln-fixtures/nosuchplugin" in message
    resp = kiln.post_build({"os": "linux", "arch": "amd64",
                            "plugins": [f"{gp.HELLO}@v9.9.9"]})
    assert resp.status_code == 400 and "v9.9.9" in resp.json()["error"]["message"]
    assert count(kiln.env["KILN_DATABASE__URL"], "SELECT count(*) FROM kiln_builds") == before


def test_compile_error_fails_with_the_go_error(kiln: KilnProcesses) -> None:
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "plugins": [gp.BROKEN]}).json()
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "failed"
    assert final["retryable"] is False
    assert final["attempts"] == 1  # a compile error is not retried
    assert "broken.go" in final["error"] and "cannot use" in final["error"]
    assert "Traceback" not in final["error"]


def test_plugin_needing_newer_core_fails_clearly(kiln: KilnProcesses) -> None:
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
                           "plugins": [gp.NEEDSNEW]}).json()
    final = kiln.wait_build(doc["key"])
    assert final["state"] == "failed"
    assert gp.NEEDSNEW_REQUIRES in final["error"]
    assert final["attempts"] == 1


BAD_INPUTS = [
    ({"os": "plan9", "arch": "amd64"}, "os"),
    ({"os": "linux", "arch": "sparc"}, "arch"),
    ({"os": "linux", "arch": "arm", "arm": "9"}, "arm"),
    ({"os": "windows", "arch": "arm"}, "arch"),
    ({"os": "linux", "arch": "amd64", "plugins": ["github.com/x/y; rm -rf /"]}, "plugins"),
    ({"os": "linux", "arch": "amd64", "plugins": ["github.com/x/$(id)"]}, "plugins"),
    ({"os": "linux", "arch": "amd64", "plugins": ["../x"]}, "plugins"),
    ({"os": "linux", "arch": "amd64", "plugins": ["github.com/x/../y"]}, "plugins"),
    ({"os": "linux", "arch": "amd64", "plugins": ["GitHub.com/x/y"]}, "plugins"),
    ({"os": "linux", "arch": "amd64", "plugins": [f"github.com/x/p{i}" for i in range(200)]},
     "plugins"),
    ({"os": "linux", "arch": "amd64", "caddy_version": "v2; reboot"}, "caddy_version"),
    ({"os": "linux", "arch": "amd64", "color": "blue"}, "color"),
    ({"arch": "amd64"}, "os"),
]


@pytest.mark.parametrize(("body", "field"), BAD_INPUTS)
def test_bad_inputs_get_400_and_leave_no_row(kiln: KilnProcesses, body: dict[str, object],
                                             field: str) -> None:
    before = count(kiln.env["KILN_DATABASE__URL"], "SELECT count(*) FROM kiln_builds")
    resp = kiln.post_build(body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["id"]
    assert error.get("field", "").startswith(field)
    assert count(kiln.env["KILN_DATABASE__URL"], "SELECT count(*) FROM kiln_builds") == before


def test_bodies_that_are_not_a_build_request(kiln: KilnProcesses) -> None:
    url = kiln.url + "/api/builds"
    huge = requests.post(url, data=b"{" + b" " * 100_000 + b"}",
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert huge.status_code == 413 and "bytes" in huge.json()["error"]["message"]
    for body in (b"not json", b"[1, 2]", b"", b"\xff\xfe"):
        resp = requests.post(url, data=body, headers={"Content-Type": "application/json"},
                             timeout=30)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["status_code"] == 400


def test_status_of_unknown_and_malformed_keys(kiln: KilnProcesses) -> None:
    missing = requests.get(f"{kiln.url}/api/builds/{'0' * 64}", timeout=10)
    assert missing.status_code == 404 and "no build" in missing.json()["error"]["message"]
    bad = requests.get(f"{kiln.url}/api/builds/..%2F..%2Fetc", timeout=10)
    assert bad.status_code == 404


def test_healthz_and_request_id(kiln: KilnProcesses) -> None:
    resp = requests.get(kiln.url + "/healthz", headers={"X-Request-Id": "abc-123"}, timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok",
                           "checks": {"database": "ok", "schema": "ok", "store": "ok"}}
    assert resp.headers["X-Request-Id"] == "abc-123"
    err = requests.get(f"{kiln.url}/api/builds/{'1' * 64}", timeout=10)
    assert err.json()["error"]["id"] == err.headers["X-Request-Id"]
    assert err.headers["X-Request-Id"] in kiln.log("api")


def test_worker_exits_cleanly_on_sigterm(kiln: KilnProcesses) -> None:
    kiln.start_worker("worker-term")
    kiln.wait_for_worker("worker-term")
    code = kiln.stop("worker-term")
    assert code == 0, kiln.log("worker-term")
    assert "worker" in kiln.log("worker-term") and "stopped" in kiln.log("worker-term")
    with psycopg.connect(kiln.env["KILN_DATABASE__URL"]) as conn:
        states = [r[0] for r in conn.execute(
            "SELECT state FROM kiln_workers ORDER BY started_at DESC LIMIT 1")]
    assert states == ["gone"]
