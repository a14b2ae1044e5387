"""Redirect-and-wait: a held download that outlasts max_wait sends its client round again."""

from __future__ import annotations

from urllib.parse import parse_qsl, urljoin, urlsplit

import falcon
import falcon.testing

from kiln.api.errors import ApiError
from kiln.api.waiting import WAIT_PARAM, redirect_to_wait, waits_so_far


class StillBuilding:
    """A download whose build never finishes within max_wait."""

    def __init__(self, max_redirects: int) -> None:
        self.max_redirects = max_redirects

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not redirect_to_wait(req, resp, max_redirects=self.max_redirects):
            raise ApiError(falcon.HTTP_504, "still building")

    on_head = on_get


def client(max_redirects: int) -> falcon.testing.TestClient:
    app = falcon.App()
    app.add_route("/api/download", StillBuilding(max_redirects))
    return falcon.testing.TestClient(app)


def follow(max_redirects: int, url: str, method: str = "GET") -> tuple[list[str], int]:
    """Follow redirects like Go's client; return the URLs requested and the final status."""
    http = client(max_redirects)
    seen = []
    for _ in range(60):
        seen.append(url)
        parts = urlsplit(url)
        result = http.simulate_request(method, parts.path, query_string=parts.query)
        if result.status_code != 307:
            return seen, result.status_code
        url = urljoin(url, result.headers["Location"])
    raise AssertionError("redirected forever")


def test_a_client_comes_back_until_the_redirects_are_spent() -> None:
    start = "http://kiln.test/api/download?os=linux&arch=amd64&p=github.com/a/b@v1&p=github.com/c/d"
    seen, status = follow(3, start)
    assert status == 504
    assert len(seen) == 4
    for number, url in enumerate(seen):
        pairs = parse_qsl(urlsplit(url).query)
        # the request itself is unchanged: same path, same parameters in the same order
        assert urlsplit(url).path == "/api/download"
        assert [p for p in pairs if p[0] != WAIT_PARAM] == [
            ("os", "linux"), ("arch", "amd64"), ("p", "github.com/a/b@v1"), ("p", "github.com/c/d")]
        assert dict(pairs).get(WAIT_PARAM, "0") == str(number)


def test_head_is_redirected_too() -> None:
    seen, status = follow(1, "http://kiln.test/api/download?os=linux&arch=amd64", "HEAD")
    assert (len(seen), status) == (2, 504)


def test_no_redirects_configured_means_the_timeout_answer() -> None:
    result = client(0).simulate_get("/api/download", query_string="os=linux")
    assert result.status_code == 504


def test_the_location_is_relative_so_a_path_prefix_survives() -> None:
    result = client(2).simulate_get("/api/download", query_string="os=linux&arch=arm64")
    assert result.status_code == 307
    assert result.headers["Cache-Control"] == "no-store"
    location = result.headers["Location"]
    assert location.startswith("?")
    # behind an API Gateway stage or a reverse proxy that mounts Kiln under a prefix
    assert urljoin("https://gw.example/prod/api/download?os=linux&arch=arm64", location) == (
        "https://gw.example/prod/api/download?os=linux&arch=arm64&kiln_wait=1")


def test_a_forged_counter_counts_as_a_first_request() -> None:
    http = client(2)
    for forged in ("abc", "-1", "99999"):
        req = falcon.testing.create_req(query_string=f"os=linux&{WAIT_PARAM}={forged}")
        assert waits_so_far(req) == 0
    # a counter at the cap gets the timeout answer at once
    spent = http.simulate_get("/api/download", query_string=f"os=linux&{WAIT_PARAM}=2")
    assert spent.status_code == 504
