"""What a client controls cannot grow the metrics, forge log lines or crash a request."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import falcon
import falcon.testing
import pytest

from kiln.api.documents import read_json
from kiln.api.errors import handle_unexpected, not_found, serialize_error
from kiln.api.metrics import MetricsMiddleware
from kiln.config import LoggingConfig
from kiln.logconfig import make_handler


class Observations:
    """A recorder that keeps each observation's labels in memory."""

    def __init__(self) -> None:
        self.labels: list[dict[str, str]] = []

    def observe(self, name: str, labels: Mapping[str, str], value: float,
                buckets: Sequence[float]) -> None:
        self.labels.append(dict(labels))


class Build:
    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        raise not_found(f"no build with key {key}")

    def on_post(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        resp.media = read_json(req, 1 << 20)


def make_client(recorder: Observations | None = None) -> falcon.testing.TestClient:
    middleware = [MetricsMiddleware(recorder)] if recorder is not None else []  # type: ignore[arg-type]
    app = falcon.App(middleware=middleware)
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_route("/api/builds/{key}", Build())
    return falcon.testing.TestClient(app)


# -- metrics labels -----------------------------------------------------------------------

STANDARD = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")
@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "TRACE", "CONNECT", "get", "X" * 200,
                                    "BREW-COFFEE"])
def test_an_unknown_method_is_counted_as_other(method: str) -> None:
    recorder = Observations()
    make_client(recorder).simulate_request(method, "/api/builds/abc")
    assert [labels["method"] for labels in recorder.labels] == ["other"]


def test_standard_methods_keep_their_names() -> None:
    recorder = Observations()
    client = make_client(recorder)
    for method in STANDARD:
        client.simulate_request(method, "/api/builds/abc")
    assert [labels["method"] for labels in recorder.labels] == list(STANDARD)


def test_routes_are_templates_and_unknown_paths_one_label() -> None:
    recorder = Observations()
    client = make_client(recorder)
    for path in ("/api/builds/one", "/api/builds/two", "/nope/../etc/passwd",
                 "/x%0Ay", "/" + "a" * 500, "/api/builds/a/b/c"):
        client.simulate_get(path)
    assert {labels["route"] for labels in recorder.labels} == {"/api/builds/{key}",
                                                               "unmatched"}


def test_falcon_s_own_errors_say_what_is_wrong() -> None:
    client = make_client()
    missing = client.simulate_get("/api/nope")
    assert missing.status_code == 404
    assert "/openapi.json" in missing.json["error"]["message"]
    wrong = client.simulate_request("PUT", "/api/builds/abc")
    assert wrong.status_code == 405
    assert "does not take PUT; it takes GET" in wrong.json["error"]["message"]


# -- log lines ----------------------------------------------------------------------------


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[tuple[io.StringIO, str]]:
    """Send kiln.api's lines, in the format of the test's ``fmt`` parameter, to a buffer."""
    fmt: Any = getattr(request, "param", "text")
    stream = io.StringIO()
    handler = make_handler(LoggingConfig(format=fmt, level="DEBUG"), process="api")
    handler.setStream(stream)
    logger = logging.getLogger("kiln.api")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield stream, fmt
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


FORGED = "/api/builds/x\n2030-01-01 00:00:00,000 ERROR api kiln.api: forged\r\x1b[2J\x00\u2028"


@pytest.mark.parametrize("captured", ["text", "json"], indirect=True)
def test_a_request_path_cannot_forge_log_lines(captured: tuple[io.StringIO, str]) -> None:
    stream, fmt = captured
    result = make_client().simulate_get(FORGED)
    assert result.status_code == 404
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    for char in "\r\x1b\x00\u2028":
        assert char not in line
    if fmt == "json":
        assert "forged" in json.loads(line)["message"]
    else:
        # still readable: the escapes show what was sent
        assert "\\n2030-01-01" in line and "\\x1b[2J" in line


def test_a_multi_line_message_is_one_text_line(captured: tuple[io.StringIO, str]) -> None:
    stream, _ = captured
    logging.getLogger("kiln.api").info("%s", "first\nsecond\tthird\x7f")
    assert stream.getvalue().count("\n") == 1
    assert "first\\nsecond" in stream.getvalue()


def test_tracebacks_keep_their_lines(captured: tuple[io.StringIO, str]) -> None:
    stream, _ = captured
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("kiln.api").exception("failed on %s", "/x\ny")
    text = stream.getvalue()
    assert text.splitlines()[0].endswith("failed on /x\\ny")
    assert "Traceback (most recent call last):\n" in text
    assert "RuntimeError: boom" in text


# -- request bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 50_000, '[{"a":' * 40_000])
def test_a_deeply_nested_body_is_a_400(body: str) -> None:
    result = make_client().simulate_post("/api/builds/abc", body=body,
                                         content_type=falcon.MEDIA_JSON)
    assert result.status_code == 400
    assert "nests too deeply" in result.json["error"]["message"]


def test_a_body_nested_within_reason_is_read() -> None:
    body = {"a": [[[[{"b": [1]}]]]]}
    result = make_client().simulate_post("/api/builds/abc", json=body)
    assert result.status_code == 200 and result.json == body


class _AnyModule:
    """Answers for any module path, as a proxy serving every module asked for would."""

    def for_request(self) -> _AnyModule:
        return self

    def available_versions(self, module: str) -> list[str]:
        return ["v1.0.0"]

    def resolve(self, module: str, query: str) -> str:
        return "v1.0.0"


def test_versions_route_keeps_a_bounded_number_of_modules() -> None:
    """Anyone may ask /api/versions about any module: its memory must not grow with them."""
    from kiln.api.compat import VERSIONS_CACHE_ENTRIES, VersionsResource

    resource = VersionsResource(resolver=_AnyModule())  # type: ignore[arg-type]
    for n in range(VERSIONS_CACHE_ENTRIES * 3):
        resource._versions(f"example.com/m{n}")
    assert len(resource._cache) == VERSIONS_CACHE_ENTRIES
    assert f"example.com/m{VERSIONS_CACHE_ENTRIES * 3 - 1}" in resource._cache  # newest kept
