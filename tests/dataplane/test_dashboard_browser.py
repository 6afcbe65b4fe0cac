"""The dashboard in a real browser: headless Chromium driven by Selenium.

Through a real `kanal run` on a temporary folder: the page loads, a route added to the
manifests appears without a reload, an endpoint turns unhealthy when its backend dies,
the page works with scripts off, and a screenshot lands in the test's output folder.

Needs Chromium and its driver (Debian: `chromium`, `chromium-driver`) and the
`selenium` package. Missing ones are installed once per session where that is
possible (root with apt-get); otherwise the tests are skipped, saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, BackendThread, Kanal, upstream_yaml

WAIT = 30.0
"""Seconds a browser condition may take before the test fails (polled, not slept)."""

# Installing Chromium on first use takes minutes (bounded by its own timeouts): the
# suite's per-test timeout covers the test bodies only.
pytestmark = pytest.mark.timeout(120, func_only=True)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "chromium-driver")

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: {name}}}
spec:
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{name}}}}}]
      backends: [{{upstream: {upstream}}}]
"""


def checked_upstream(name: str, backend: Backend) -> str:
    """An Upstream whose endpoint is checked every 200 ms and judged on one check."""
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\n"
            f"spec:\n  endpoints: [{{address: 127.0.0.1, port: {backend.port}}}]\n"
            "  healthCheck: {path: /healthz, interval: 200ms, timeout: 200ms,"
            " healthyThreshold: 1, unhealthyThreshold: 1}\n")


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/lib/chromium/{name}"
                                       if os.path.exists(f"/usr/lib/chromium/{name}") else None)
        if found:
            return found
    return None


def _try_install() -> str:
    """Install Chromium and its driver with apt-get where we may; why not, otherwise."""
    if shutil.which("apt-get") is None:
        return "no apt-get to install chromium and chromium-driver with"
    if os.geteuid() != 0:
        return "not root: cannot apt-get install chromium chromium-driver"
    try:
        for command in (["apt-get", "update"],
                        ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
            done = subprocess.run(command, capture_output=True, timeout=600, check=False,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode != 0:
                return f"{' '.join(command)} failed: {done.stderr.decode()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing chromium failed: {exc}"
    return ""


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installed once if missing; skips with the reason."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    browser, driver = _find(BROWSERS), _find(DRIVERS)
    if browser is None or driver is None:
        why = _try_install()
        browser, driver = _find(BROWSERS), _find(DRIVERS)
        if browser is None or driver is None:
            pytest.skip(f"no Chromium with chromedriver found ({why or 'not on PATH'})")
    return browser, driver


@pytest.fixture
def browser(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start headless Chromium sessions: `page = browser()`, or `browser(scripts=False)`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    started: list[Any] = []

    def start(*, scripts: bool = True) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                     f"--user-data-dir={tmp_path / f'chromium-profile-{len(started)}'}"):
            options.add_argument(flag)
        if not scripts:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2})
        service = Service(executable_path=chromedriver, log_output=str(tmp_path / "driver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(WAIT)
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.quit()


@pytest.fixture
def backend_pool() -> Iterator[BackendThread]:
    pool = BackendThread()
    yield pool
    pool.close()


def _wait(driver: Any, what: str, condition: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what} not seen within {WAIT}s; the page shows:\n"
                             f"{driver.find_element('tag name', 'body').text}") from None


def _rows(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def test_dashboard_follows_manifests_and_backends_live(
    browser: Callable[..., Any], backend_pool: BackendThread,
    kanal: Callable[..., Kanal], tmp_path: Path,
) -> None:
    web, api = backend_pool.start("web"), backend_pool.start("api")
    k = kanal({
        "upstreams.yaml": checked_upstream("web", web) + "---\n" + checked_upstream("api", api),
        "web.yaml": ROUTE.format(name="web", upstream="web"),
    })
    page = browser()
    page.get(k.admin + "/ui")
    assert page.title == "Kanal dashboard"
    _wait(page, "the route default/web", lambda d: _rows(d, 'tr[data-route="default/web"]'))
    assert page.find_element("id", "version").text == k.version()
    # A mark in the page's own state: it survives only if the page is never reloaded.
    page.execute_script("window.kanalTestMark = 'same page';")
    _wait(page, "the live indicator", lambda d: "live" in d.find_element("id", "status").text)

    old = k.version()
    k.write("api.yaml", ROUTE.format(name="api", upstream="api"))
    new = k.wait_for_new_version(old)
    _wait(page, "the new route default/api",
          lambda d: _rows(d, 'tr[data-route="default/api"]'))
    _wait(page, "the new version", lambda d: d.find_element("id", "version").text == new)

    endpoint = f'tr[data-endpoint="127.0.0.1:{api.port}"]'
    _wait(page, "the api endpoint healthy",
          lambda d: _rows(d, endpoint + '[data-health="healthy"]'))
    backend_pool.run(api.stop())
    row = _wait(page, "the api endpoint unhealthy",
                lambda d: (_rows(d, endpoint + '[data-health="unhealthy"]') or [None])[0])
    assert "unhealthy" in row.text
    _wait(page, "the failed health check among recent errors",
          lambda d: "upstream default/api: an endpoint failed its health check"
          in d.find_element("id", "errors").text)
    # The web endpoint is still fine, and the page was never reloaded.
    assert _rows(page, f'tr[data-endpoint="127.0.0.1:{web.port}"][data-health="healthy"]')
    assert page.execute_script("return window.kanalTestMark;") == "same page"

    shot = tmp_path / "dashboard.png"
    assert page.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The backend comes back on its port: healthy again, still on the same page.
    backend_pool.start("api", port=api.port)
    _wait(page, "the api endpoint healthy again",
          lambda d: _rows(d, endpoint + '[data-health="healthy"]'))
    assert page.execute_script("return window.kanalTestMark;") == "same page"
    page.save_screenshot(str(tmp_path / "dashboard-recovered.png"))


def test_dashboard_is_plain_tables_with_scripts_off(
    browser: Callable[..., Any], backend_pool: BackendThread,
    kanal: Callable[..., Kanal], tmp_path: Path,
) -> None:
    web = backend_pool.start("web")
    k = kanal({"upstreams.yaml": upstream_yaml("web", web),
               "web.yaml": ROUTE.format(name="web", upstream="web")})
    page = browser(scripts=False)
    page.get(k.admin + "/ui")
    assert _rows(page, 'tr[data-route="default/web"]')
    assert _rows(page, f'tr[data-endpoint="127.0.0.1:{web.port}"][data-health="healthy"]')
    # The script never ran: the indicator still says what the static page does.
    assert "refreshes every 5 s" in page.find_element("id", "status").text
    page.save_screenshot(str(tmp_path / "dashboard-no-scripts.png"))
