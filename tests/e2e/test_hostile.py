"""Malformed and malicious requests to every route of a real server: each a 4xx in Kiln's shape.

The cases come from tables: hostile values for each path parameter of each route, query
strings, headers, bodies and methods. Every answer must be a 4xx JSON error
(``{"status_code": N, "error": {"message": ...}}``) that says what is wrong; none a 5xx.
Afterwards no build, group, webhook or stored file is left behind, and the metrics hold
no label a client chose.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses

pytestmark = pytest.mark.slow

FLUSH_SECONDS = 0.3
#: the API's default body limit (api.max_body_bytes)
MAX_BODY = 64 * 1024
KEY = "f" * 64
VALID = {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST}


@pytest.fixture(scope="module")
def kiln_env() -> dict[str, str]:
    return {"KILN_METRICS__FLUSH_SECONDS": str(FLUSH_SECONDS)}


def short(text: str) -> str:
    """Return a readable test id for a long path or query: the build key abbreviated."""
    text = text.replace(KEY, "<key>")
    return text if len(text) <= 70 else f"{text[:60]}...({len(text)})"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


# -- paths --------------------------------------------------------------------------------

#: routes that take a build key, a group id or an artifact digest; {} is the value
ROUTES = (
    "/api/builds/{}", "/api/builds/{}/artifact", "/api/builds/{}/artifact.sig",
    "/api/builds/{}/artifact.sha256", "/api/builds/{}/provenance", "/api/builds/{}/sbom",
    "/api/builds/{}/log", "/api/builds/{}/events", "/api/groups/{}", "/api/artifacts/{}",
    "/builds/{}",
)
#: hostile values of a path parameter, already percent-encoded as sent
SEGMENTS = {
    "dotdot": "..%2F..%2F..%2Fetc%2Fpasswd",
    "dot-segments": "%2e%2e",
    "nul": "%00",
    "nul-after-key": KEY + "%00",
    "newline": "abc%0D%0AX-Injected:%201",
    "esc": "%1b%5b2J",
    "long": "a" * 3000,
    "long-hex": "f" * 2000,
    "short-key": "f" * 63,
    "long-key": "f" * 65,
    "upper-key": "F" * 64,
    "bad-percent": "%zz",
    "lone-percent": "%",
    "invalid-utf8": "%c3%28%ff%fe",
    "overlong-utf8": "%c0%af",
    "fullwidth": "%ef%bd%86" * 64,
    "space-key": "%20" + KEY,
    "sql": "%27%3B%20DROP%20TABLE%20kiln_builds%3B--",
    "negative": "-1",
}

PATH_CASES = [
    Case(f"{route.split('{}')[0]}<{name}>{route.split('{}')[1]}", "GET", route.format(value))
    for route in ROUTES for name, value in SEGMENTS.items()
]

RAW_PATHS = [
    "/api/builds/../../../etc/passwd", "/api/../metrics/../etc/passwd", "/%00", "/api/%00",
    "/api/builds/" + KEY + "/artifact/../../../../etc/passwd", "/static/..%2F..%2Fkiln%2Fconfig.py",
    "/static/%00", "/static/" + "a" * 3000, "/static/%2e%2e", "/static/..", "/api/" + "x/" * 1000,
    "/api/builds/" + KEY + "/nope", "/api/nope", "/.env", "/.git/config", "/%2e%2e/%2e%2e/",
    "/api/admin/../../etc/passwd", "/wp-login.php", "/api/builds%00", "/api/%zz",
]
PATH_CASES += [Case(f"raw {short(path)}", "GET", path) for path in RAW_PATHS]


# -- query strings ------------------------------------------------------------------------

def query_cases() -> list[Case]:
    long_path = "github.com/" + "/".join(["a"] * 400)
    download = [
        "", "os=linux", "arch=amd64", "os=../../etc&arch=amd64", "os=linux%00&arch=amd64",
        "os=linux&arch=amd%0a64", "os=linux&arch=amd64&arm=8", "os=linux&arch=arm&arm=%00",
        "os=linux&arch=amd64&version=v99.99.99", "os=linux&arch=amd64&version=..%2F..",
        "os=linux&arch=amd64&version=%00", "os=linux&arch=amd64&version=" + "9" * 3000,
        "os=linux&arch=amd64&version=v2&caddy_version=v3",
        "os=linux&arch=amd64&os=windows", "os=linux&arch=amd64&bogus=1",
        "os=linux&arch=amd64&p=..%2F..%2Fetc%2Fpasswd",
        "os=linux&arch=amd64&p=%2Fetc%2Fpasswd",
        "os=linux&arch=amd64&p=github.com%2Fa%2Fb%40%00",
        "os=linux&arch=amd64&p=github.com%2Fa%2Fb%40v1.0.0%0a",
        "os=linux&arch=amd64&p=file%3A%2F%2F%2Fetc%2Fpasswd",
        "os=linux&arch=amd64&p=github.com%2Fkiln-fixtures%2Fnope%40v1.0.0",
        "os=linux&arch=amd64&p=" + long_path,
        "os=linux&arch=amd64&" + "&".join(["p=github.com%2Fa%2Fb"] * 60),
        "os=linux&arch=amd64&r=" + gp.HELLO + "%3D%3E%2Fetc",
        "os=linux&arch=amd64&r=" + gp.HELLO + "%3D%3E..%2F..%2F..",
        "os=linux&arch=amd64&r=" + gp.HELLO + "%3D%3Egithub.com%2Fevil%2Fx%40bad",
        "os=linux&arch=amd64&r=%3D%3E", "os=linux&arch=amd64&r=%00",
        "os=linux&arch=amd64&%zz=1", "os=linux&kiln_wait=-1%00",
        "os=" + "l" * 3000 + "&arch=amd64",
    ]
    cases = [Case(f"download?{short(q)}", "GET", f"{route}?{q}" if q else route)
             for q in download for route in ("/api/download",)]
    cases += [Case(f"compat?{short(q)}", "GET", f"/api/compat?{q}") for q in download[:12]]
    others = [
        "/api/builds?limit=0", "/api/builds?limit=-1", "/api/builds?limit=abc",
        "/api/builds?limit=" + "9" * 40, "/api/builds?limit=1e3", "/api/builds?limit=%00",
        "/api/builds?limit=101",
        "/api/versions?module=..%2F..%2Fetc", "/api/versions?module=%00",
        "/api/versions?module=github.com%2Fkiln-fixtures%2Fnope",
        "/api/versions?module=" + "a" * 3000, "/api/versions?module=file%3A%2F%2F%2Fetc",
        "/api/versions?module=github.com%2FA%2FB%0a",
        "/api/plugin-versions", "/api/plugin-versions?path=", "/api/plugin-versions?path=%00",
        "/api/plugin-versions?path=..%2F..%2Fetc%2Fpasswd",
        "/api/plugin-versions?path=github.com%2Fkiln-fixtures%2Fnope",
        "/api/plugin-versions?path=file%3A%2F%2F%2Fetc%2Fpasswd",
        "/api/plugin-versions?path=http%3A%2F%2F127.0.0.1%3A1%2Fx",
        "/api/plugin-versions?path=%ff%fe",
        "/api/signing-key?key_id=..%2F..%2Fetc", "/api/signing-key?key_id=%00",
        "/api/signing-key?key_id=" + "a" * 3000,
        f"/api/builds/{KEY}/events?last_event_id=%00", f"/api/builds/{KEY}/events?last_event_id=-1",
        f"/api/builds/{KEY}/log?offset=abc",
        "/api/admin/builds?state=..%2F", "/api/admin/builds?limit=-5",
        "/api/admin/workers?x=%00",
        # past gunicorn's request line limit (4094 bytes): refused before the app sees it
        "/api/builds?limit=" + "9" * 5000, "/api/admin/builds?state=" + "%5B" * 2000,
    ]
    cases += [Case(f"query {short(q)}", "GET", q) for q in others]
    return cases


# -- headers ------------------------------------------------------------------------------

HEADERS: dict[str, tuple[tuple[str, str], ...]] = {
    "huge-bearer": (("Authorization", "Bearer " + "x" * 7000),),
    "two-bearers": (("Authorization", "Bearer kiln_aaaa"), ("Authorization", "Bearer kiln_bbbb")),
    "basic": (("Authorization", "Basic Zm9vOmJhcg=="),),
    "bearer-empty": (("Authorization", "Bearer"),),
    "bearer-spaces": (("Authorization", "Bearer    "),),
    "bearer-latin1": (("Authorization", "Bearer kiln_\xe9\xe8"),),
    "unknown-scheme": (("Authorization", "Negotiate abc"),),
    "comma-bearer": (("Authorization", "Bearer a, Bearer b"),),
    "forwarded-junk": (("X-Forwarded-For", "not-an-ip, ::ffff:999.1.1.1, " + "1." * 500),),
    "request-id-huge": (("X-Request-Id", "r" * 5000),),
    "request-id-odd": (("X-Request-Id", "../\t<script>"),),
    "range-junk": (("Range", "bytes=zz-yy"),),
    "range-many": (("Range", "bytes=" + ",".join(f"{i}-{i}" for i in range(500))),),
    "last-event-id": (("Last-Event-ID", "\xff" * 100),),
    "accept-odd": (("Accept", "*/*;q=" + "9" * 1000),),
    # past gunicorn's header limits (8190 bytes a field, 100 fields): refused before the app
    "header-huge": (("X-Padding", "x" * 9000),),
    "headers-many": tuple((f"X-Pad-{i}", "x") for i in range(120)),
}


def header_cases() -> list[Case]:
    targets = (f"/api/builds/{KEY}", f"/api/builds/{KEY}/artifact", f"/api/builds/{KEY}/events",
               "/api/admin/builds")
    return [Case(f"header {name} {short(target)}", "GET", target, headers=headers)
            for name, headers in HEADERS.items() for target in targets]


# -- bodies -------------------------------------------------------------------------------

def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


BODIES: dict[str, bytes] = {
    "empty": b"",
    "null": b"null",
    "list": b"[]",
    "number": b"1",
    "string": b'"linux"',
    "truncated": b'{"os": "linux"',
    "single-quotes": b"{'os': 'linux'}",
    "trailing-comma": b'{"os": "linux",}',
    "invalid-utf8": b'{"os": "\xff\xfe"}',
    "invalid-utf8-key": b'{"\xc3\x28": 1}',
    "utf16": '{"os": "linux", "arch": "amd64", "bogus": 1}'.encode("utf-16"),
    "bom-unknown-field": b"\xef\xbb\xbf" + body({**VALID, "bogus": 1}),
    "nul-byte": b'{"os": "linux\x00"}',
    "nan": b'{"os": NaN, "arch": "amd64"}',
    "infinity-arm": b'{"os": "linux", "arch": "arm", "arm": Infinity}',
    "huge-float": b'{"os": "linux", "arch": "arm", "arm": 1e999}',
    "huge-int-arm": b'{"os": "linux", "arch": "arm", "arm": 99999999999999999999999}',
    "int-past-limit": b'{"os": "linux", "arch": "arm", "arm": ' + b"9" * 5000 + b"}",
    "deep-list": b"[" * 5000 + b"]" * 5000,
    "deep-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "deep-in-plugins": body({**VALID, "plugins": json.loads("[" * 500 + "]" * 500)}),
    "os-list": body({**VALID, "os": ["linux"]}),
    "os-number": body({**VALID, "os": 1}),
    "os-dotdot": body({**VALID, "os": "../../etc"}),
    "os-nul": body({**VALID, "os": "linux\x00"}),
    "arch-space": body({**VALID, "arch": "amd 64"}),
    "arm-bool": body({**VALID, "arch": "arm", "arm": True}),
    "arm-8": body({**VALID, "arch": "arm", "arm": 8}),
    "version-dotdot": body({**VALID, "caddy_version": "../.."}),
    "version-shell": body({**VALID, "caddy_version": "v2.0.0;rm -rf /"}),
    "version-space": body({**VALID, "caddy_version": "v2.7.6 v2.8.4"}),
    "version-long": body({**VALID, "caddy_version": "v" + "9" * 20000}),
    "version-unknown": body({**VALID, "caddy_version": "v99.99.99"}),
    "version-number": body({**VALID, "caddy_version": 2.8}),
    "plugins-string": body({**VALID, "plugins": gp.HELLO}),
    "plugins-numbers": body({**VALID, "plugins": [1, 2]}),
    "plugins-object": body({**VALID, "plugins": {"a": "b"}}),
    "plugin-dotdot": body({**VALID, "plugins": ["../../etc/passwd@v1.0.0"]}),
    "plugin-absolute": body({**VALID, "plugins": ["/etc/passwd"]}),
    "plugin-file-url": body({**VALID, "plugins": ["file:///etc/passwd"]}),
    "plugin-nul": body({**VALID, "plugins": [f"{gp.HELLO}@v0.1.0\x00"]}),
    "plugin-newline": body({**VALID, "plugins": [f"{gp.HELLO}@v0.1.0\nevil"]}),
    "plugin-bad-version": body({**VALID, "plugins": [f"{gp.HELLO}@not..a..version"]}),
    "plugin-unknown-version": body({**VALID, "plugins": [f"{gp.HELLO}@v9.9.9"]}),
    "plugin-unknown": body({**VALID, "plugins": ["github.com/kiln-fixtures/nope@v1.0.0"]}),
    "plugin-long": body({**VALID, "plugins": ["github.com/" + "a/" * 5000 + "b"]}),
    "plugins-many": body({**VALID, "plugins": [f"github.com/x/p{i}" for i in range(500)]}),
    "plugin-dup": body({**VALID, "plugins": [f"{gp.HELLO}@v0.1.0", f"{gp.HELLO}@v0.2.0"]}),
    "replace-local": body({**VALID, "replacements": [f"{gp.HELLO}=>/etc"]}),
    "replace-relative": body({**VALID, "replacements": [f"{gp.HELLO}=>../../.."]}),
    "replace-bad-version": body({**VALID, "replacements": [f"{gp.HELLO}=>github.com/e/x@bad"]}),
    "replace-empty": body({**VALID, "replacements": ["=>"]}),
    "replace-numbers": body({**VALID, "replacements": [1]}),
    "replace-unknown": body({**VALID, "replacements": ["github.com/a/b=>github.com/c/d@v1.0.0"]}),
    "unknown-field": body({**VALID, "__proto__": {"admin": True}}),
    "callback-file": body({**VALID, "callback_url": "file:///etc/passwd"}),
    "callback-loopback": body({**VALID, "callback_url": "http://127.0.0.1:1/hook"}),
    "callback-metadata": body({**VALID, "callback_url": "http://169.254.169.254/latest"}),
    "callback-number": body({**VALID, "callback_url": 5}),
    "platforms-junk": body({**VALID, "platforms": ["../..", 1]}),
    "platforms-object": body({**VALID, "platforms": {"os": "linux"}}),
    "too-large": b'{"os": "' + b"a" * (MAX_BODY + 10) + b'"}',
}

CONTENT_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")


def body_cases() -> list[Case]:
    cases = [Case(f"POST {name}", "POST", "/api/builds", data,
                  (("Content-Type", "application/json"),))
             for name, data in BODIES.items()]
    # the same wrong bodies under other content types, and forms
    cases += [Case(f"POST {name} as {ctype}", "POST", "/api/builds", BODIES[name],
                   (("Content-Type", ctype),))
              for name in ("os-dotdot", "deep-list", "invalid-utf8", "plugin-unknown")
              for ctype in CONTENT_TYPES[1:]]
    cases.append(Case("POST form", "POST", "/api/builds", b"os=linux&arch=amd64",
                      (("Content-Type", "application/x-www-form-urlencoded"),)))
    cases += [Case(f"POST {name} to {short(path)}", "POST", path, BODIES[name],
                   (("Content-Type", "application/json"),))
              for name in ("deep-list", "invalid-utf8", "os-dotdot")
              for path in (f"/api/admin/builds/{KEY}/rebuild", f"/api/builds/{KEY}")]
    return cases


# -- methods ------------------------------------------------------------------------------

ODD_METHODS = ("PUT", "PATCH", "TRACE", "CONNECT", "PROPFIND", "FOO", "BREW", "MKCOL")
METHOD_PATHS = ("/api/builds", f"/api/builds/{KEY}", f"/api/builds/{KEY}/artifact",
                "/api/download", "/metrics", "/healthz", "/api/nope", "/", f"/builds/{KEY}",
                "/api/packages", "/api/platforms", "/openapi.json", "/api/signing-key")


def method_cases() -> list[Case]:
    cases = [Case(f"{method} {short(path)}", method, path, b"{}")
             for method in ODD_METHODS for path in METHOD_PATHS]
    cases += [Case(f"DELETE {short(path)}", "DELETE", path)
              for path in (f"/api/builds/{KEY}", "/api/builds/..%2F..", f"/api/groups/{KEY}",
                           f"/api/admin/builds/{KEY}/artifact", "/api/builds")]
    return cases


CASES = PATH_CASES + query_cases() + header_cases() + body_cases() + method_cases()
assert len(CASES) >= 200, len(CASES)
assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


def send(kiln: KilnProcesses, case: Case) -> tuple[int, dict[str, str], bytes]:
    """Send a case byte for byte (no client-side normalization of its path)."""
    conn = http.client.HTTPConnection("127.0.0.1", kiln.port, timeout=30)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in case.headers:
            conn.putheader(name, value)
        if case.body is not None:
            conn.putheader("Content-Length", str(len(case.body)))
        conn.endheaders(case.body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_hostile_request_gets_a_4xx_saying_why(kiln: KilnProcesses, case: Case) -> None:
    status, headers, data = send(kiln, case)
    assert 400 <= status < 500, (status, data[:500])
    assert headers.get("content-type", "").startswith("application/json"), (headers, data[:200])
    doc = json.loads(data)
    assert doc["status_code"] == status
    message = doc["error"]["message"]
    assert isinstance(message, str) and message.strip()
    # a message says what is wrong, not only the status's name ("404 Not Found")
    assert not re.fullmatch(r"\d{3} [A-Za-z ]+", message), message


#: tables a rejected request must not have written to
TABLES = ("kiln_builds", "kiln_attempts", "kiln_groups", "kiln_webhooks", "kiln_attestations",
          "kiln_build_logs", "kiln_api_keys")


def test_nothing_is_left_behind(kiln: KilnProcesses) -> None:
    with psycopg.connect(kiln.db_url) as conn:
        counts = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                  for table in TABLES}
    assert counts == dict.fromkeys(TABLES, 0)
    store = kiln.root / "artifacts"
    assert not [p for p in Path(store).rglob("*") if p.is_file()] if store.exists() else True


def test_metrics_hold_no_label_a_client_chose(kiln: KilnProcesses) -> None:
    time.sleep(FLUSH_SECONDS * 4)
    with psycopg.connect(kiln.db_url) as conn:
        rows = conn.execute("SELECT labels FROM kiln_metrics WHERE name = "
                            "'kiln_http_request_duration_seconds'").fetchall()
    methods = {row[0]["method"] for row in rows}
    routes = {row[0]["route"] for row in rows}
    assert "other" in methods
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert all(route == "unmatched" or route.startswith("/") and ".." not in route
               and "%" not in route for route in routes), routes


def test_every_log_line_is_one_record(kiln: KilnProcesses) -> None:
    # request paths above held newlines, carriage returns and ESC: none may start a line
    for line in kiln.log("api").splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) \
            or line.startswith("[20"), line  # gunicorn's master, before Kiln's logging


# last: it makes an admin key, which test_nothing_is_left_behind would count

@pytest.fixture(scope="module")
def admin_token(kiln: KilnProcesses) -> str:
    made = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", "create", "ops",
                           "--scope", "admin", "--json"], cwd=REPO, env=kiln.env,
                          capture_output=True, text=True, timeout=60, check=True)
    return str(json.loads(made.stdout)["token"])


@pytest.mark.parametrize("value", ["%00", "a%00b", "k_%0A", "%1B%5B31m", "k" * 300])
def test_an_admin_filter_no_requester_can_match_is_a_400(kiln: KilnProcesses, admin_token: str,
                                                         value: str) -> None:
    status, headers, data = send(kiln, Case(value, "GET", f"/api/admin/builds?requested_by={value}",
                                            headers=(("Authorization", f"Bearer {admin_token}"),)))
    assert status == 400, (status, data[:500])
    assert headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert error["field"] == "requested_by" and "key id" in error["message"], error
