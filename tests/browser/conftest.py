"""Headless Chromium for the console and JupyterLab tests: Debian's browser, driven by Playwright.

Playwright's own browser download cannot run here, so the browser is the system's `chromium`
(`apt-get install chromium`, which `./run.sh test` does). As root, Chromium needs `--no-sandbox`.
A failing test leaves a screenshot of every page it opened under `test-artifacts/screenshots/`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def chromium_path() -> str:
    path = os.environ.get("SANDBOX_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("headless Chromium is needed: `apt-get install chromium` (./run.sh test installs it)")
    return path


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module: Playwright's sync API keeps an event loop running on the main thread
    while it is open, and a later module's `asyncio.run` would fail inside it."""
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory of pages, each in its own browser context (its own cookies), screenshot if the test fails."""
    contexts: list[Any] = []
    pages: list[Any] = []

    def make(**context_options: Any) -> Any:
        context = browser.new_context(**context_options)
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        pages.append(page)
        return page

    yield make
    failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                 for when in ("setup", "call"))
    if failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
        for index, page in enumerate(pages):
            try:
                page.screenshot(path=str(SCREENSHOTS / f"{stem}-{index}.png"), full_page=True)
            except Exception as error:  # a closed page: nothing to show
                print(f"no screenshot of page {index}: {error}")
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `sandbox serve` (API, console and embedded worker) on SQLite, shared by one module's tests."""
    from cli.server import serving

    root = tmp_path_factory.mktemp("console")
    with serving(root / "home", log=root / "server.log") as running:
        yield running


@pytest.fixture
def sign_in() -> Any:
    """Sign in to the console as a person would: open it, paste the token, press the button."""

    def sign(page: Any, url: str, token: str) -> None:
        page.goto(f"{url}/console/")
        page.fill("textarea[name=token]", token)
        page.click("button:has-text('Sign in')")
        page.wait_for_url(f"{url}/console/")

    return sign


from jobworld import analysis_image  # noqa: E402 - the job image, built once per session

__all__ = ["analysis_image"]
