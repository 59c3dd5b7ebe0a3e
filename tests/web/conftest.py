"""A real browser for the pages' tests: Debian's chromium driven by Playwright.

One browser per module (`chromium`), a fresh context per page a test opens
(`browse`), so tests share no cookies. Playwright's own browsers are never
downloaded: `make deps` installs Debian's chromium, `.[test]` playwright.
With PINK_SCREENSHOTS=DIR, `browse.shot(page, name)` saves DIR/<name>.png
(docs/screenshots/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
WAIT_MS = 20_000  # what a page may take to show something (a task's state, a row)


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: `make deps` installs Debian's chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Browse:
    """Opens pages of one pink-web as a user; records script errors and CSP refusals."""

    def __init__(self, chromium):
        self.chromium = chromium
        self.contexts = []
        self.problems: list[str] = []

    def page(self, config, viewport=DESKTOP):
        context = self.chromium.new_context(base_url=config.web.url, ignore_https_errors=True,
                                            viewport=viewport, accept_downloads=True)
        context.set_default_timeout(WAIT_MS)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.problems.append(f"script error: {exc}"))
        page.on("console", lambda msg: self.problems.append(f"console: {msg.text}")
                if msg.type == "error" and "Content Security Policy" in msg.text else None)
        return page

    def login(self, config, name: str, password: str, path: str = "/", viewport=DESKTOP):
        """A page logged in through the login form, showing `path`."""
        page = self.page(config, viewport)
        page.goto(path)
        page.fill("#username", name)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/login" not in url)
        return page

    @staticmethod
    def shot(page, name: str) -> None:
        """Save a screenshot as $PINK_SCREENSHOTS/<name>.png (nothing without it)."""
        folder = os.environ.get("PINK_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / f"{name}.png"))

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def browse(chromium):
    b = Browse(chromium)
    yield b
    b.close()
    assert not b.problems, "\n".join(b.problems)

