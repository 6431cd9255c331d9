"""Headless Debian Chromium through Playwright, against the session's real gateway process.

Playwright never downloads a browser here: it drives /usr/bin/chromium. Without it the browser tests
skip, except in CI (CI=true), where they must run.
"""

import os

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture
def open_page(transactional_db, sim, monkeypatch):
    """open_page(viewport=None) -> a new page on the gateway; fails the test on any uncaught page error.

    Playwright's sync API keeps an asyncio loop marked as running in this thread while it is started,
    and Django then refuses sync ORM calls (the test's own, and the database fixtures'). The calls are
    safe (that loop is suspended while the test runs), so the check is lifted for this test only, and
    the browser is started after the gateway and the database and stopped before them, so that
    neither a server process nor a later test inherits any of it.
    """
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser tests (./dev test installs it)")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)

        def open_(viewport=None):
            context = browser.new_context(base_url=sim.base_url, viewport=viewport or {"width": 1280, "height": 800})
            page = context.new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda error: errors.append(error))
            return page

        try:
            yield open_
        finally:
            browser.close()
    assert not errors, f"uncaught errors in the page: {errors}"
