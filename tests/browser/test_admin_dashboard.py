"""The usage dashboard in headless Chromium against a real gateway process (the `sim` gateway
serves the whole app: admin, WebSocket and API). An operator signs in through /admin/login/, opens
the dashboard, and watches a real stream, started through the API, enter the live panel and leave
it; the panel says "stale" when its updates stop; the time range, charts and links (issue 19, item 9)
work on a desktop and a phone; and its figures agree with each other and with /metrics (item 10).
Screenshots: artifacts/admin-dashboard*.png.

The gateway runs with DEBUG off: the dashboard's CSS and script are inline, so the page works even where static
files are not served (only Django's own admin stylesheet would be missing there).
"""

import json
import re
import threading
from datetime import UTC, datetime, timedelta

import httpx2
import pytest
from django.utils import timezone
from playwright.sync_api import expect

from quotas.models import DailyUsage, Usage
from tests.support.browser import PASSWORD, screenshot
from tests.support.gateways import settled_row

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
    assert page.locator("#tokens-chart rect.hover").count() == 30  # one per day, with its figures as a tooltip
    assert page.locator("#tokens-chart rect.completion").count() == 4  # the days with tokens
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


def sign_in(page, user, path):
    """Through the admin's login form, landing on `path` (waits allow 20 s: the machine may be busy)."""
    page.set_default_timeout(20_000)
    page.goto(f"/admin/login/?next={path}")
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"**{path}", wait_until="domcontentloaded")
    return page


def box(locator):
    found = locator.bounding_box()
    assert found is not None, locator
    return found


def today_by_hour(caller, other):
    """Today's ledger rows at known hours (first-token times, a failure), and rollups for today and yesterday."""
    today = timezone.now().astimezone(UTC).date()
    midnight = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    hour = max(1, min(timezone.now().astimezone(UTC).hour, 22))  # not hour 0, where the failure is
    for n, ms in enumerate((120, 180, 200, 260, 900)):
        Usage.objects.create(request_id=f"req_today_{caller.pk}_{n}", user=caller, model="sim-small",
                             status=Usage.Status.COMPLETED, started_at=midnight + timedelta(hours=hour, minutes=n),
                             prompt_tokens=10, completion_tokens=90, time_to_first_token_ms=ms, duration_ms=2000,
                             day=today, month=today.strftime("%Y-%m"))
    Usage.objects.create(request_id=f"req_today_{other.pk}_failed", user=other, model="sim-large",
                         status=Usage.Status.UPSTREAM_ERROR, reason="upstream_error", started_at=midnight,
                         completion_tokens=40, time_to_first_token_ms=300, day=today, month=today.strftime("%Y-%m"))
    for user, model, tokens in ((caller, "sim-small", 500), (other, "sim-large", 40)):
        DailyUsage.objects.create(user=user, model=model, date=today, requests=5, completion_tokens=tokens)
        DailyUsage.objects.create(user=user, model=model, date=today - timedelta(days=1), requests=9,
                                  completion_tokens=2 * tokens)


def test_dashboard_periods_charts_and_links_on_a_desktop_and_a_phone(open_page, make_user):
    operator, caller, other = make_user(staff=True).user, make_user().user, make_user().user
    today_by_hour(caller, other)
    page = sign_in(open_page({"width": 1280, "height": 800}), operator, "/admin/quotas/usage/dashboard/")
    expect(page.locator("#period-title")).to_have_text("The last 30 days (UTC)")
    wide = box(page.locator("#tokens-chart svg"))["width"]

    # Today, by hour: the charts have 24 buckets; the first-token and error-rate charts come from the ledger.
    page.get_by_role("link", name="Today", exact=True).click()
    page.wait_for_url("**range=today", wait_until="domcontentloaded")
    expect(page.locator("#period-title")).to_contain_text("by hour")
    expect(page.locator("#tokens-chart rect.hover")).to_have_count(24)
    assert page.locator("#tokens-chart .sluice-axis span").last.inner_text() == "23:00"
    expect(page.locator("#card-p50")).to_contain_text("0.20 s")  # 120 180 200 260 300 900: rank 3 of 6
    expect(page.locator("#card-p95")).to_contain_text("0.90 s")
    assert page.locator("#ttft-chart path.p50.dots").get_attribute("d").count("M") == 2  # hour 0 and the busy hour
    assert page.locator("#rates-chart path.errors.dots").get_attribute("d").startswith("M5 0")  # hour 0: 1 of 1 failed
    expect(page.locator("#card-failed")).to_contain_text("1")
    screenshot(page, "admin-dashboard-today")

    # The top rows open the ledger filtered to them (and to the period).
    page.locator("#top-users").get_by_role("link", name=caller.username).click()
    page.wait_for_url("**user__id__exact=*", wait_until="domcontentloaded")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(5)
    assert all(caller.username in text for text in rows.all_inner_texts())
    page.go_back()
    page.locator("#top-models").get_by_role("link", name="sim-large").click()
    page.wait_for_url("**model=sim-large*", wait_until="domcontentloaded")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list tbody tr")).to_contain_text("upstream_error")

    # Dates of one's own: two days, by day.
    page.goto("/admin/quotas/usage/dashboard/")
    yesterday = (timezone.now().astimezone(UTC).date() - timedelta(days=1)).isoformat()
    page.fill("#range-from", yesterday)
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**from=*", wait_until="domcontentloaded")
    expect(page.locator("#tokens-chart rect.hover")).to_have_count(2)
    expect(page.locator("#card-tokens")).to_contain_text("1,620")  # 500 + 40, and 1,000 + 80 the day before

    # The same page on a phone: the charts shrink to the screen (no reload), nothing scrolls sideways, and the
    # last label stays inside its chart.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_function(f"document.querySelector('#tokens-chart svg').getBoundingClientRect().width < {wide}")
    for chart in ("#tokens-chart", "#ttft-chart", "#rates-chart"):
        plot, last = box(page.locator(f"{chart} svg")), box(page.locator(f"{chart} .sluice-axis span").last)
        assert plot["width"] < 390 and plot["x"] >= 0
        assert plot["x"] <= last["x"] and last["x"] + last["width"] <= plot["x"] + plot["width"] + 0.5
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "admin-dashboard-phone")


def test_the_live_panel_says_stale_when_its_updates_stop(open_page, make_user):
    """The snapshots are held back between the server and the page (the server still gets its acknowledgements, so
    it keeps sending): the panel flags itself stale, then recovers when they flow again."""
    operator = make_user(staff=True).user
    held = threading.Event()
    page = open_page()

    def relay(ws):
        server = ws.connect_to_server()

        def from_server(message):
            if held.is_set():
                server.send(json.dumps({"ack": json.loads(message)["seq"]}))
            else:
                ws.send(message)

        server.on_message(from_server)

    page.route_web_socket(re.compile(r".*/ws/admin/live/$"), relay)
    sign_in(page, operator, "/admin/quotas/usage/dashboard/")
    status = page.locator("#live-status")
    expect(status).to_contain_text("0 stream(s) running")
    held.set()
    expect(status).to_contain_text("stale: no update for", timeout=15_000)
    expect(page.locator("#live")).to_have_class(re.compile(r"\bstale\b"))
    screenshot(page, "admin-dashboard-stale", full_page=False)
    held.clear()
    expect(status).to_contain_text("0 stream(s) running", timeout=15_000)
    expect(page.locator("#live")).not_to_have_class(re.compile(r"\bstale\b"))


def refusal_counts(page):
    """{reason: count} of sluice_refusals_total, read from /metrics in the operator's browser."""
    page.goto("/metrics")
    text = page.locator("body").inner_text()
    return {reason: float(n) for reason, n in
            re.findall(r'^sluice_refusals_total\{reason="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_the_dashboards_figures_agree_with_each_other_and_with_metrics(open_page, sim, make_user):
    operator = make_user(staff=True).user
    limited, narrow, failing = make_user(requests_per_minute=1), make_user(allowed_models=["sim-large"]), make_user()
    page = sign_in(open_page(), operator, "/metrics")
    before = refusal_counts(page)

    body = {"model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    url = sim.api_url + "/chat/completions"
    for key, expected in ((limited.key, 200), (limited.key, 429), (narrow.key, 404)):
        assert httpx2.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == expected
    sim.control(fail_midstream_after=2)
    broken = httpx2.post(url, json={**body, "stream": True}, headers={"Authorization": f"Bearer {failing.key}"})
    assert '"code": "upstream_error"' in broken.text
    assert settled_row(broken.headers["x-request-id"]).reason == "upstream_error"
    now, today = timezone.now(), timezone.now().date()
    Usage.objects.create(request_id="req_cut_at_the_quota", user=failing.user, model="sim-small",
                         status=Usage.Status.QUOTA_EXHAUSTED, reason="insufficient_quota", started_at=now,
                         completion_tokens=30, day=today, month=today.strftime("%Y-%m"))

    counted = {reason: n - before.get(reason, 0) for reason, n in refusal_counts(page).items()}
    assert {reason: n for reason, n in counted.items() if n} == {"rate_limit_exceeded": 1, "model_not_found": 1}
    page.goto("/admin/quotas/usage/dashboard/?range=today")
    # The refusal made before any model was chosen has no row among the models (it was a blank one); the provider's
    # failure has its code.
    models = page.locator("#top-models tbody tr td:first-child").all_inner_texts()
    assert models and all(name.strip() for name in models), models
    assert page.locator("#upstream-errors tbody tr").all_inner_texts() == ["upstream_error\t1"]
    # The card, the table's total and /metrics count the same refusals; the cut is counted apart.
    expect(page.locator("#card-refused b")).to_have_text("2")
    expect(page.locator("#refusals-total")).to_have_text("2")
    reasons = page.locator("#refusals tbody tr").all_inner_texts()
    assert sorted(reasons) == ["model_not_found\t1", "rate_limit_exceeded\t1"]
    expect(page.locator("#card-cut b")).to_have_text("1")
    expect(page.locator("#cut-total")).to_have_text("1")
    for chart in ("#tokens-chart", "#ttft-chart", "#rates-chart"):
        plot, last = box(page.locator(f"{chart} svg")), box(page.locator(f"{chart} .sluice-axis span").last)
        assert last["x"] + last["width"] <= plot["x"] + plot["width"] + 0.5, chart  # the last label is not clipped
    screenshot(page, "admin-dashboard-numbers")
