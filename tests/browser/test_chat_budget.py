"""The chat page's meter in money (issue 18, items 4 and 5), in headless Chromium against the session's gateway: a
meter per budget the plan sets, the near-limit note and the spent banner naming a budget, and the refusals.

The gateway serves "sim-priced" (the simulator's sim-small) at 1,000 per million prompt tokens and 4,000 per million
completion tokens: 0.001 and 0.004 USD a token. The page's "hello" is 8 prompt tokens and the simulator answers 48,
so an answer costs 0.008 + 0.192 = 0.20 USD. Token limits are far away: only the budgets bind.
"""

import datetime
import re
from decimal import Decimal

import httpx2
import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.test_chat_page import PHONE, answered_with, delta, log_in, send, settled
from tests.support.browser import screenshot, sign_in
from tests.support.gateways import eventually

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

MODEL = "sim-priced"
RESETS = re.compile(r"^Resets in \d")


def served(gateway, key):
    response = httpx2.get(gateway.api_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return [model["id"] for model in response.json()["data"]]


@pytest.fixture
def priced(sim, make_user):
    """The catalogue's one model, priced, served by the session gateway once it has reloaded its catalogue; taken
    away at the end, and the gateway back on its settings' models, before the next test starts."""
    from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel

    simulator = Provider.objects.create(name="simulator", base_url="")
    model = ServedModel.objects.create(name=MODEL)
    Deployment.objects.create(model=model, provider=simulator, upstream_model="sim-small")
    ModelPrice.objects.create(model=model, effective_from=timezone.now() - datetime.timedelta(days=1),
                              input=Decimal("1000"), output=Decimal("4000"))
    probe = make_user().key
    eventually(lambda: served(sim, probe) == [MODEL], timeout=10, interval=0.1)
    yield model
    model.delete()
    simulator.delete()
    eventually(lambda: MODEL not in served(sim, probe), timeout=10, interval=0.1)


def meter_text(page, period):
    return page.locator(f"#budget-{period}-window p").first


def test_the_money_meters_show_each_budget_and_what_an_answer_spent(open_page, sim, make_user, priced):
    caller = make_user(budget_per_day=Decimal("5"), budget_per_month=Decimal("50"))
    page = sign_in(open_page(), caller.user)
    for period, label, limit in (("day", "Budget today", "5.00"), ("month", "Budget this month", "50.00")):
        window = page.locator(f"#budget-{period}-window")
        expect(window).to_be_visible()
        expect(page.get_by_label(label, exact=True)).to_have_js_property("value", 0)  # the <progress>, by its label
        expect(meter_text(page, period)).to_have_text(f"0.00 of {limit} USD spent · {limit} left")
        expect(page.locator(f"#budget-{period}-reset")).to_have_text(RESETS)
        expect(window).to_have_attribute("data-level", "ok")

    send(page, "hello")
    settled(page)
    # Once the answer's lease has settled: what it cost, not what it held.
    expect(meter_text(page, "day")).to_have_text("0.20 of 5.00 USD spent · 4.80 left")
    expect(meter_text(page, "month")).to_have_text("0.20 of 50.00 USD spent · 49.80 left")
    assert page.get_by_label("Budget today", exact=True).evaluate("meter => meter.value") == pytest.approx(0.04)
    expect(page.locator("#near-limit")).to_be_hidden()
    screenshot(page, "chat-budget-meters", full_page=False)

    # A later /api/quota without a budget (the operator removed it) hides the money meters again.
    def without_budget(route):
        quota = route.fetch().json()
        quota["budget"] = None
        route.fulfill(json=quota)

    page.route("**/api/quota", without_budget)
    send(page, "hello")
    settled(page)
    expect(page.locator("#budget-day-window")).to_be_hidden()
    expect(page.locator("#budget-month-window")).to_be_hidden()
    expect(page.locator("#day-window")).to_be_visible()


def test_a_user_without_a_budget_sees_no_money_meter(open_page, sim, make_user, priced):
    page = sign_in(open_page(), make_user().user)
    send(page, "hello")
    settled(page)
    for period in ("day", "month"):
        window = page.locator(f"#budget-{period}-window")
        assert window.count() == 1  # the page has the meter; this plan sets no budget
        expect(window).to_be_hidden()
    assert "USD" not in page.locator(".quota").inner_text()
    expect(page.locator("#day-used")).not_to_have_text("0")  # the answer was metered, in tokens


def test_near_a_budget_the_note_names_it_in_money(open_page, sim, make_user, priced):
    # 0.20 of 0.24: 83 % used, 0.04 left (the tokens: 56 of 200,000).
    page = sign_in(open_page(), make_user(budget_per_day=Decimal("0.24")).user)
    note = page.locator("#near-limit")
    expect(note).to_be_hidden()
    send(page, "hello")
    settled(page)
    expect(note).to_have_text(re.compile(r"^You have used 83 % of today's budget: 0\.04 USD left\. Resets in \d.*\.$"))
    expect(note).to_have_attribute("role", "status")
    expect(page.locator("#budget-day-window")).to_have_attribute("data-level", "warn")
    expect(page.locator("#day-window")).to_have_attribute("data-level", "ok")
    screenshot(page, "chat-budget-near", full_page=False)

    # What is left, however small, is never shown as nothing; and the tightest window is the one the note names.
    def nearly_spent(route):
        quota = route.fetch().json()
        quota["budget"]["day"].update(used="0.2399996", remaining="0.0000004")
        quota["tokens"]["day"].update(used=180_000, remaining=20_000)  # 90 % of today's tokens: less tight
        route.fulfill(json=quota)

    page.route("**/api/quota", nearly_spent)
    page.reload()
    expect(note).to_have_text(re.compile(r"^You have used 99 % of today's budget: < 0\.000001 USD left\. "))
    expect(meter_text(page, "day")).to_have_text("0.239999 of 0.24 USD spent · < 0.000001 left")
    expect(page.locator("#budget-day-window")).to_have_attribute("data-level", "critical")


BANNER = re.compile(r"^You've spent all of today's budget \(0\.10 USD\), so you can't send until it resets\. "
                    r"Resets in \d")


def test_a_spent_budget_holds_send_with_a_banner_naming_it(open_page, sim, make_user, priced):
    # 0.10: the prompt and 23 of the 48 tokens; the answer is clamped to what the budget could pay for.
    caller = make_user(budget_per_day=Decimal("0.1"))
    page = sign_in(open_page(), caller.user)
    send(page, "hello")
    answer = settled(page)
    expect(answer.locator(".notice")).to_have_text(re.compile("^This answer was cut short by your quota"))
    # Believed once the answer's lease has settled (docs/demo.md): then the banner, and Send held.
    expect(page.locator("#banner-text")).to_have_text(BANNER)
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    expect(meter_text(page, "day")).to_have_text("0.10 of 0.10 USD spent · 0.00 left")
    expect(page.locator("#budget-day-window")).to_have_attribute("data-level", "critical")
    expect(page.locator("#near-limit")).to_be_hidden()  # the banner's, not the note's

    screenshot(page, "chat-budget-spent", full_page=False)

    page = log_in(open_page(viewport=PHONE), caller.user)  # and on load, on a phone
    expect(page.locator("#banner-text")).to_have_text(BANNER)
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    expect(page.locator("#budget-day-window")).to_be_visible()
    expect(page.locator("#budget-month-window")).to_be_hidden()  # the plan sets no monthly budget
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "chat-budget-spent-phone", full_page=False)


def test_a_refusal_for_a_spent_budget_names_the_budget_not_the_tokens(open_page, sim, make_user, priced):
    caller = make_user(budget_per_day=Decimal("0.1"))
    page = sign_in(open_page(), caller.user)
    expect(meter_text(page, "day")).to_have_text("0.00 of 0.10 USD spent · 0.10 left")
    # Spent elsewhere (another client of the user's) while the page still shows it whole.
    response = httpx2.post(sim.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}, timeout=30)
    assert response.status_code == 200, response.text
    eventually(lambda: httpx2.get(sim.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"})
               .json()["budget"]["day"]["remaining"] == "0")
    send(page, "hello")
    refused = page.locator(".turn.user[data-state=refused] .notice")
    expect(refused).to_have_text(re.compile(r"^Not sent: you've spent all of today's budget \(0\.10 USD\)\. "
                                            r"Resets in \d"))
    expect(page.locator("#banner-text")).to_have_text(BANNER)
    expect(page.get_by_role("button", name="Send")).to_be_disabled()

    # An answer cut mid-way by a budget: the stream's error names it, and the page says what is left of it.
    page = sign_in(open_page(), make_user(budget_per_day=Decimal("5")).user)
    error = {"message": "You exceeded your daily budget (USD). It resets at 2026-12-06T00:00:00+00:00.",
             "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}
    answered_with(page, delta(" partial"), {"error": error})
    send(page, "a long one")
    cut = settled(page)
    expect(cut.locator(".notice")).to_have_text(re.compile(
        r"^The answer was cut short: only 5\.00 USD of today's budget is left, too few to continue\. Resets in \d"))
