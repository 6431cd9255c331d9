"""The usage dashboard in headless Chromium against a real gateway process (the `sim` gateway
serves the whole app: admin, WebSocket and API). An operator signs in through /admin/login/, opens
the dashboard, and watches a real stream, started through the API, enter the live panel and leave
it; the screenshot is kept in artifacts/admin-dashboard.png.

The gateway runs with DEBUG off and serves no static files: the dashboard's CSS and script are
inline, so the page works without them (only Django's own admin stylesheet is missing there).
"""

import threading

import httpx2
import pytest
from django.utils import timezone

from quotas.models import DailyUsage, Usage
from tests.support.browser import PASSWORD, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def history(user):
    """Some past usage for the chart and the tables."""
    today, now = timezone.now().date(), timezone.now()
    for back, tokens in enumerate((1200, 800, 0, 1500, 400)):
        DailyUsage.objects.create(user=user, model="sim-small", date=today - timezone.timedelta(days=back),
                                  requests=tokens // 100, prompt_tokens=tokens // 4, completion_tokens=tokens,
                                  refusals=int(back == 0))
    Usage.objects.create(request_id=f"req_refused_{user.pk}", user=user, model="sim-small",
                         status=Usage.Status.REJECTED, reason="rate_limit_exceeded", started_at=now,
                         day=today, month=today.strftime("%Y-%m"))


class SlowStream(threading.Thread):
    """A real streaming request through the gateway, read line by line until `stop` is set."""

    def __init__(self, gateway, key):
        super().__init__(daemon=True)
        self.gateway, self.key, self.stop = gateway, key, threading.Event()

    def run(self):
        body = {"model": "sim-small", "stream": True, "max_tokens": 500,
                "messages": [{"role": "user", "content": "take your time"}]}
        with httpx2.Client(timeout=30) as http, http.stream(
                "POST", self.gateway.api_url + "/chat/completions", json=body,
                headers={"Authorization": f"Bearer {self.key}"}) as response:
            for _ in response.iter_lines():
                if self.stop.is_set():
                    break


def test_operator_watches_a_running_stream_on_the_dashboard(open_page, sim, make_user):
    operator, caller = make_user(staff=True).user, make_user()
    history(caller.user)
    sim.control(tokens_per_second=20)  # 500 tokens: 25 s unless stopped
    page = open_page({"width": 1280, "height": 1100})
    page.goto("/admin/login/?next=/admin/quotas/usage/dashboard/")
    page.fill("#id_username", operator.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/quotas/usage/dashboard/")
    assert page.locator("#tokens-chart rect.completion").count() == 30
    assert caller.user.username in page.locator("#top-users").inner_text()
    assert "rate_limit_exceeded" in page.locator("#refusals").inner_text()
    page.locator("#live-status", has_text="0 stream(s) running").wait_for()

    stream = SlowStream(sim, caller.key)
    stream.start()
    try:
        row = page.locator("#live-rows tr", has_text=caller.user.username)
        row.wait_for(timeout=15_000)
        cells = row.locator("td").all_inner_texts()
        assert cells[1] == "sim-small" and cells[4] in ("flowing", "paused")
        page.locator("#live-status", has_text="1 stream(s) running").wait_for()
        screenshot(page, "admin-dashboard")
    finally:
        stream.stop.set()
        stream.join(timeout=30)
    row.wait_for(state="detached")  # the stream ended: it leaves the panel
