"""The web UI in a real headless Chromium: pick plugins, build, watch the log, download, run.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright's Python package.
``KILN_UPDATE_SCREENSHOT=1`` also saves the finished build page to docs/ui.png.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from playwright.sync_api import expect

from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
BUILD_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def kiln_env(kiln_root: Path) -> dict[str, str]:
    # the operator's plugin catalog, which the form searches
    catalog = kiln_root / "catalog.json"
    catalog.write_text(json.dumps({"result": [
        {"path": gp.HELLO, "downloads": 7,
         "modules": [{"name": gp.HELLO_ID, "docs": "Says hello."}]},
        {"path": gp.DNS_PACKAGE, "downloads": 3,
         "modules": [{"name": gp.DNS_ID, "docs": "An example DNS provider."}]},
    ]}))
    # a signing key, so the page has a signature to show
    key_file = kiln_root / "signing.pem"
    key_file.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return {"KILN_PLUGINS__CATALOG_FILE": str(catalog), "KILN_SIGNING__KEY_FILE": str(key_file)}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def log_lines(page: Any) -> int:
    return int(page.locator("#log .line").count())


#: run in each page the test opens: records whether #result was visible when the first
#: line of the build's log was added
FIRST_LINE_WATCH = """
window.kilnResultAtFirstLine = null;
document.addEventListener("DOMContentLoaded", () => {
  const log = document.querySelector("#log"), result = document.querySelector("#result");
  if (!log || !result) return;
  const look = () => {
    if (window.kilnResultAtFirstLine === null && log.querySelector(".line")) {
      window.kilnResultAtFirstLine = result.checkVisibility() ? "shown" : "hidden";
    }
  };
  look();
  new MutationObserver(look).observe(log, {childList: true, subtree: true});
});
"""


def test_pick_two_plugins_build_watch_download_and_run(kiln: KilnProcesses, browser: Any,
                                                      tmp_path: Path) -> None:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(kiln.url + "/")

    # every control is reachable by its label
    page.get_by_label("Platform").select_option("linux/amd64")
    page.get_by_label("Caddy version").fill("v2.8.0")
    search = page.get_by_label("Search the catalog, or type a Go module path")
    expect(page.locator("#catalog-status")).to_contain_text("2 plugins in the catalog")
    # search by a module name, pick with the keyboard
    search.fill("hello")
    matches = page.get_by_role("listbox", name="Matching plugins")
    expect(matches.get_by_role("option")).to_have_count(1)
    search.press("ArrowDown")
    search.press("Enter")
    # search by path, pick with the mouse
    search.fill("dns")
    matches.get_by_role("option", name=gp.DNS_PACKAGE).click()
    expect(page.locator("#selected-plugins li")).to_have_count(2)
    # a version for each plugin, offered from the module proxy
    hello_version = page.get_by_label(f"Version of {gp.HELLO}")
    expect(page.locator(f"#{hello_version.get_attribute('list')} option")).to_have_count(
        len(gp.HELLO_VERSIONS))
    hello_version.fill("v0.1.0")
    # the build page notes, as its first log line arrives, whether a result is shown yet
    # (checked in the page itself: a fast build on a busy machine could end between two
    # looks from here)
    page.add_init_script(FIRST_LINE_WATCH)
    page.get_by_role("button", name="Build").click()

    page.wait_for_url("**/builds/*", timeout=60_000)
    key = page.url.rsplit("/", 1)[-1]
    assert len(key) == 64
    # log lines arrive while the build runs, before there is anything to download
    page.locator("#log .line").first.wait_for(state="attached", timeout=BUILD_TIMEOUT_MS)
    early = log_lines(page)
    assert page.evaluate("window.kilnResultAtFirstLine") == "hidden"
    download_link = page.locator("#download")
    download_link.wait_for(state="visible", timeout=BUILD_TIMEOUT_MS)
    assert log_lines(page) >= early  # a fast build may have logged all before the page came
    assert page.locator("#state").inner_text() == "Built"
    assert page.locator("#log").inner_text().splitlines()[-1].startswith("succeeded: ")
    sha256 = page.locator("#sha256").inner_text()
    assert len(sha256) == 64
    signature = requests.get(f"{kiln.url}/api/builds/{key}/artifact.sig", timeout=30).content
    expect(page.locator("#signature")).to_have_text(base64.b64encode(signature).decode())
    assert [s.get_attribute("class") for s in page.locator("#steps li").all()][0] == "step done"

    with page.expect_download() as info:
        download_link.click()
    download = info.value
    assert download.suggested_filename == "caddy_linux_amd64_custom"
    binary = tmp_path / download.suggested_filename
    download.save_as(binary)
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == sha256
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    out = subprocess.run([str(binary), "list-modules", "--versions"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert f"{gp.HELLO_ID} v0.1.0" in out
    assert f"{gp.DNS_ID} {gp.DNS_LATEST}" in out

    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("KILN_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "ui.png")

    # the page of a build can be shared: a fresh visitor sees the finished build
    other = context.new_page()
    other.set_viewport_size({"width": 390, "height": 844})  # a phone
    other.goto(f"{kiln.url}/builds/{key}")
    other.locator("#download").wait_for(state="visible", timeout=30_000)
    assert other.locator("#sha256").inner_text() == sha256
    assert other.locator("#log .line").count() == log_lines(page)
    # nothing wider than the phone's screen
    assert other.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert other.locator(f"#recent-list a[href='/builds/{key}']").count() == 1
    assert errors == []
    context.close()


def test_a_bad_plugin_path_is_explained_on_the_form(kiln: KilnProcesses, browser: Any) -> None:
    page = browser.new_page()
    page.goto(kiln.url + "/")
    search = page.get_by_label("Search the catalog, or type a Go module path")
    search.fill("github.com/kiln-fixtures/nosuchplugin")
    page.get_by_role("button", name="Add").click()
    page.get_by_role("button", name="Build").click()
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible", timeout=60_000)
    assert "github.com/kiln-fixtures/nosuchplugin" in alert.inner_text()
    assert page.url == kiln.url + "/"
    page.close()


def test_a_refused_live_stream_is_retried_then_polled_to_the_end(
        kiln: KilnProcesses, kiln_root: Path, browser: Any) -> None:
    """An API that holds no streams (api.max_held: 0) answers 503: the page still follows."""
    busy = KilnProcesses(db_url=kiln.db_url, root=kiln_root / "busy",
                         goproxy=kiln.env["KILN_BUILD__GOPROXY"],
                         cache_dir=Path(kiln.env["KILN_BUILD__CACHE_DIR"]),
                         env={"KILN_API__MAX_HELD": "0"})
    try:
        busy.start_api()
        # a build no other test asks for, built by the module's worker
        resp = busy.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
                                "plugins": [f"{gp.HELLO}@v0.1.0"]})
        assert resp.status_code in (200, 202), resp.text
        key = resp.json()["key"]
        refused = requests.get(f"{busy.url}/api/builds/{key}/events", timeout=30)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0

        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{busy.url}/builds/{key}")
        expect(page.locator("#state")).to_contain_text("Server busy, retrying in",
                                                       timeout=30_000)
        # refused every time, the page polls the build until it ends, then shows it all
        page.locator("#download").wait_for(state="visible", timeout=BUILD_TIMEOUT_MS)
        assert page.locator("#state").inner_text() == "Built"
        doc = requests.get(f"{busy.url}/api/builds/{key}", timeout=30).json()
        assert page.locator("#sha256").inner_text() == doc["artifact"]["sha256"]
        assert log_lines(page) > 0
        assert page.locator("#log").inner_text().splitlines()[-1].startswith("succeeded: ")
        assert [s.get_attribute("class") for s in page.locator("#steps li").all()] == [
            "step done"] * page.locator("#steps li").count()
        assert errors == []
        page.close()
    finally:
        busy.close()
