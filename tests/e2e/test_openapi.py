"""/openapi.json describes every route, and the running server keeps to it.

Three checks: every (method, route) of the Falcon app is in the document (and nothing
else is); real answers of a real build validate against the document's schemas; and
Schemathesis, against the running server's /openapi.json, finds no 5xx and no answer
that departs from the document.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from falcon import inspect

from kiln.api.app import create_app
from kiln.api.openapi import openapi_spec
from kiln.config import load_config
from kiln.wiring import make_services
from tests import fuzzing
from tests.fixtures import goproxy as gp
from tests.service import KilnProcesses, template_database

#: test cases per operation: enough to reach every documented answer, small enough to run
#: in well under a minute on two shared cores (`python -m bench --only fuzz` runs thousands)
MAX_EXAMPLES = 8


def app_routes(db_url: str) -> set[tuple[str, str, str]]:
    """Return (METHOD, route template, resource class) of every responder of the app."""
    config = load_config("/dev/null", env={"KILN_DATABASE__URL": db_url})
    services = make_services(config)
    try:
        app = create_app(services)
        return {(m.method, route.path, route.class_name)
                for route in inspect.inspect_routes(app)
                for m in route.methods if not m.internal}
    finally:
        if services.metrics is not None:
            services.metrics.stop()
        services.queue.pool.close()


def test_every_route_is_described(db_url: str) -> None:
    spec = openapi_spec()
    routes = app_routes(db_url)
    missing = sorted(f"{method} {path} ({cls})" for method, path, cls in routes
                     if method.lower() not in spec["paths"].get(path, {}))
    assert not missing, (
        "routes missing from kiln/api/openapi.py (add them to _paths()):\n  "
        + "\n  ".join(missing))
    served = {(method.lower(), path) for method, path, _ in routes}
    stale = sorted(f"{method.upper()} {path}" for path, methods in spec["paths"].items()
                   for method in methods if (method, path) not in served)
    assert not stale, "kiln/api/openapi.py describes routes the app does not have:\n  " + \
        "\n  ".join(stale)


def test_every_operation_lists_its_statuses_without_a_default() -> None:
    for path, methods in openapi_spec(auth_mode="keys")["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            assert "default" not in responses, f"{method.upper()} {path} has a default response"
            # what any route may answer: a bad key, a bug, a database that cannot serve
            assert {"401", "500", "503"} <= set(responses), f"{method.upper()} {path}"
            assert all(code.isdigit() and 100 <= int(code) < 600 for code in responses)


def test_security_follows_the_auth_mode() -> None:
    open_mode = openapi_spec(auth_mode="open")["paths"]
    keys_mode = openapi_spec(auth_mode="keys", metrics_public=False)["paths"]
    assert open_mode["/api/builds"]["post"]["security"] == [{}, {"bearer": []}]
    assert keys_mode["/api/builds"]["post"]["security"] == [{"bearer": []}]
    assert keys_mode["/api/download"]["get"]["security"] == [{"bearer": []}]
    assert open_mode["/api/admin/workers"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in open_mode["/metrics"]["get"]
    assert keys_mode["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in open_mode["/api/builds/{key}"]["get"]


# -- against a running server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str, pg_template: str,
           proxy_dir: Path, go_cache_dir: Path) -> Iterator[tuple[KilnProcesses, str]]:
    url = template_database(pg_server_url, pg_template, "kiln_openapi")
    with fuzzing.serve(db_url=url, root=tmp_path_factory.mktemp("openapi"),
                       proxy_dir=proxy_dir, cache_dir=go_cache_dir) as served:
        yield served


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Return a validator of ``schema`` whose "#/components/..." references resolve in ``spec``."""
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def check(spec: dict[str, Any], path: str, method: str, resp: requests.Response) -> None:
    """Assert that ``resp`` is an answer the document allows for this operation.

    The document has no ``default`` response: a status it does not name for the operation
    is an answer a client cannot expect, and fails.
    """
    op = spec["paths"][path][method]
    documented = op["responses"].get(str(resp.status_code))
    assert documented is not None, (
        f"{method.upper()} {path} answered {resp.status_code}, which the document does not "
        f"list (it lists {sorted(op['responses'])}): {resp.text[:300]}")
    content = documented.get("content")
    if not content:
        return
    media = resp.headers["Content-Type"].split(";")[0].strip()
    assert media in content, f"{method} {path}: {media} not among {list(content)}"
    if media == "application/json":
        schema = content[media]["schema"]
        errors = list(validator(spec, schema).iter_errors(resp.json()))
        assert not errors, f"{method} {path} {resp.status_code}: {errors[0]}"


@pytest.mark.slow
def test_real_answers_match_the_document(served: tuple[KilnProcesses, str]) -> None:
    service, token = served
    auth = {"Authorization": f"Bearer {token}"}
    spec = requests.get(service.url + "/openapi.json", timeout=30).json()
    assert spec == json.loads(json.dumps(openapi_spec(auth_mode="keys")))
    body = {"os": "linux", "arch": "amd64", "caddy_version": gp.CADDY_OLDEST,
            "plugins": [f"{gp.HELLO}@v0.1.0"]}
    posted = requests.post(service.url + "/api/builds", json=body, headers=auth, timeout=60)
    check(spec, "/api/builds", "post", posted)
    key = posted.json()["key"]
    assert service.wait_build(key)["state"] == "succeeded"
    base = f"{service.url}/api/builds/{key}"
    answers = [
        ("/api/builds", "post", requests.post(service.url + "/api/builds", json=body,
                                              headers=auth, timeout=60)),
        ("/api/builds", "post", requests.post(service.url + "/api/builds", json={"os": 1},
                                              headers=auth, timeout=60)),
        ("/api/builds", "post", requests.post(service.url + "/api/builds", json=body,
                                              timeout=60)),
        ("/api/builds", "get", requests.get(service.url + "/api/builds", timeout=30)),
        ("/api/builds/{key}", "get", requests.get(base, timeout=30)),
        ("/api/builds/{key}", "delete", requests.delete(base, headers=auth, timeout=30)),
        ("/api/builds/{key}/artifact", "get", requests.get(base + "/artifact", timeout=30)),
        ("/api/builds/{key}/artifact.sha256", "get",
         requests.get(base + "/artifact.sha256", timeout=30)),
        ("/api/builds/{key}/log", "get", requests.get(base + "/log", timeout=30)),
        ("/api/admin/builds", "get", requests.get(service.url + "/api/admin/builds",
                                                  headers=auth, timeout=30)),
        ("/api/admin/workers", "get", requests.get(service.url + "/api/admin/workers",
                                                   headers=auth, timeout=30)),
        ("/api/admin/builds/{key}/rebuild", "post",
         requests.post(f"{service.url}/api/admin/builds/{'0' * 64}/rebuild", headers=auth,
                       timeout=30)),
        ("/healthz", "get", requests.get(service.url + "/healthz", timeout=30)),
        ("/api/platforms", "get", requests.get(service.url + "/api/platforms", timeout=30)),
        # a public route still checks a key that is sent
        ("/api/platforms", "get", requests.get(service.url + "/api/platforms", timeout=30,
                                               headers={"Authorization": "Bearer kiln_no"})),
    ]
    statuses = []
    for path, method, resp in answers:
        check(spec, path, method, resp)
        statuses.append(resp.status_code)
    assert statuses[:4] == [200, 400, 401, 200]
    assert statuses[5] == 409  # a succeeded build cannot be cancelled
    assert statuses[-1] == 401


@pytest.mark.slow
def test_schemathesis_finds_nothing(served: tuple[KilnProcesses, str], tmp_path: Path) -> None:
    service, token = served
    # real identifiers, so that operations reach past their 404; then no worker runs
    work = fuzzing.write_config(tmp_path, fuzzing.prepare(service, token))
    argv = fuzzing.command(service, token, max_examples=MAX_EXAMPLES, seed=7,
                           report_dir=tmp_path / "report")
    run = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_COLOR": "1", "COLUMNS": "160"}, check=False)
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    report = fuzzing.read_report(tmp_path / "report")
    assert report.cases > 0 and report.server_errors == 0 and not report.failures, report
