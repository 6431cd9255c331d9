"""Headless Debian Chromium for the browser tests (tests/browser/): where it is, how it starts, and page helpers."""

from pathlib import Path

from bench.servers import PROJECT_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = PROJECT_ROOT / "artifacts"
PASSWORD = "a-long-test-password"


def sign_in(page, user):
    """Sign in through the login form; lands on the chat page with the plan loaded."""
    page.goto("/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/")
    page.wait_for_function("!document.getElementById('send').disabled")
    return page


def screenshot(page, name, full_page=True):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=full_page)
