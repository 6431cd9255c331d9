"""The operator's admin in headless Chromium against a real gateway process (issue 19, items 6–8): the site's name,
allowed models ticked from a list and the plan's values beside blank overrides; a new API key shown once, with a copy
button and snippets, the keys' status filter and an audited deletion; tables an operator reads at 1280 px.
Screenshots: artifacts/admin-*.png.
"""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from playwright.sync_api import expect

from quotas.models import ApiKey, AuditEntry, Plan, Usage, UserQuota
from tests.support.browser import PASSWORD, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def sign_in(page, user, path="/admin/"):
    """Through the admin's login form, landing on `path`. The machine may be busy (two cores shared with other test
    runs): navigations wait for the document, not every stylesheet, and waits allow 20 s."""
    page.set_default_timeout(20_000)
    page.goto(f"/admin/login/?next={path}")
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"**{path}", wait_until="domcontentloaded")
    return page


def fits(page):
    """Nothing wider than the window: neither the page nor a changelist's table scrolls sideways."""
    return page.evaluate("""document.documentElement.scrollWidth <= window.innerWidth &&
        [...document.querySelectorAll('#changelist .results')].every(e => e.scrollWidth <= e.clientWidth)""")


def test_models_are_ticked_from_a_list_and_overrides_show_the_plans_values(open_page, make_user):
    operator, caller = make_user(staff=True).user, make_user(tokens_per_day=10_000, requests_per_minute=30)
    bigger = Plan.objects.create(name="bigger", tokens_per_day=50_000)
    page = sign_in(open_page(), operator)
    assert page.title() == "Operations | Sluice admin"
    assert page.locator("#site-name").inner_text() == "Sluice"

    page.goto(f"/admin/quotas/plan/{caller.plan.pk}/change/")
    boxes = page.locator("input[name=allowed_models]")
    assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == settings.SLUICE_MODELS
    page.get_by_label("sim-small", exact=True).check()
    page.click("input[name=_save]")
    page.wait_for_url("**/admin/quotas/plan/", wait_until="domcontentloaded")
    assert Plan.objects.get(pk=caller.plan.pk).allowed_models == ["sim-small"]

    quota = UserQuota.objects.get(user=caller.user)
    page.goto(f"/admin/quotas/userquota/{quota.pk}/change/")
    per_day = page.locator("#id_tokens_per_day")
    assert per_day.get_attribute("placeholder") == "plan: 10,000" and per_day.input_value() == ""
    expect(page.locator(".field-tokens_per_day .help")).to_have_text("plan: 10,000")
    expect(page.locator(".field-requests_per_minute .help")).to_have_text("plan: 30")
    expect(page.locator(".field-allowed_models .help")).to_contain_text("plan: sim-small")
    screenshot(page, "admin-quota-overrides")
    # Another plan chosen: the values beside the overrides follow it before anything is saved.
    page.select_option("#id_plan", str(bigger.pk))
    expect(per_day).to_have_attribute("placeholder", "plan: 50,000")
    expect(page.locator(".field-allowed_models .help")).to_contain_text("plan: every configured model")


def test_a_new_key_is_shown_once_and_keys_are_filtered_and_deleted_with_an_audit(open_page, sim, make_user):
    # One test for the keys' pages: the gateway process keeps the admin's content type ids, which the database flush
    # between tests renumbers (a second test's deletion would log against a stale id).
    operator, caller = make_user(staff=True).user, make_user()
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_in(page, operator, f"/admin/quotas/apikey/add/?user={caller.user.pk}")
    page.fill("#id_name", "laptop")
    page.click("input[name=_save]")
    page.wait_for_url("**/issued/", wait_until="domcontentloaded")
    key = ApiKey.objects.get(user=caller.user, name="laptop")
    raw = page.locator("#raw-key").inner_text()
    assert key.matches(raw)

    page.get_by_role("button", name="Copy key").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == raw
    curl, python = page.locator("#curl-snippet").inner_text(), page.locator("#python-snippet").inner_text()
    assert f"export SLUICE_KEY={raw}" in curl and f"curl -N {sim.base_url}/v1/chat/completions" in curl
    assert f"base_url='{sim.base_url}/v1', api_key='{raw}'" in python
    screenshot(page, "admin-key-issued")

    page.reload()  # shown once: a refresh neither shows it again nor issues another
    expect(page.locator("#key-gone")).to_contain_text("was shown once")
    assert page.locator("#raw-key").count() == 0 and raw not in page.content()
    assert ApiKey.objects.filter(user=caller.user).count() == 2  # make_user's and this one
    screenshot(page, "admin-key-shown-once", full_page=False)

    # The status filter.
    now = timezone.now()
    revoked, _ = ApiKey.issue(caller.user, name="old-laptop")
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=now)
    expired, _ = ApiKey.issue(caller.user, name="trial", expires_at=now - timedelta(hours=1))
    page.goto("/admin/quotas/apikey/")
    page.locator("#changelist-filter").get_by_role("link", name="revoked").click()
    page.wait_for_url("**status=revoked", wait_until="domcontentloaded")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list tbody tr")).to_contain_text("old-laptop")
    page.locator("#changelist-filter").get_by_role("link", name="expired").click()
    expect(page.locator("#result_list tbody tr")).to_contain_text("trial")
    expect(page.locator("#result_list .sluice-badge")).to_have_text("expired")
    assert fits(page)
    screenshot(page, "admin-keys-expired", full_page=False)

    # A deletion is audited, like a revocation.
    page.goto(f"/admin/quotas/apikey/{expired.pk}/delete/")
    page.get_by_role("button", name="Yes, I’m sure").click()
    page.wait_for_url("**/admin/quotas/apikey/", wait_until="domcontentloaded")
    entry = AuditEntry.objects.get(action=AuditEntry.Action.KEY_DELETED)
    assert (entry.actor_id, entry.old["name"]) == (operator.pk, "trial")
    page.goto("/admin/quotas/auditentry/")
    expect(page.locator("#result_list tbody tr").first).to_contain_text("API key deleted")
    expect(page.locator("#result_list tbody tr").first).to_contain_text("name: trial → –")


def test_tables_read_well_at_1280_px(open_page, make_user):
    operator, caller, paused = make_user(staff=True).user, make_user(tokens_per_day=1_000_000), make_user()
    UserQuota.objects.filter(user=paused.user).update(suspended=True)
    now = timezone.now()
    Usage.objects.create(request_id="req_0123456789abcdef0123456789abcdef", user=caller.user, model="sim-large",
                         status=Usage.Status.UPSTREAM_ERROR, reason="upstream_error", started_at=now,
                         prompt_tokens=1234, completion_tokens=12_000, duration_ms=1534, time_to_first_token_ms=420,
                         day=now.date(), month=now.strftime("%Y-%m"))
    for n in range(12):
        Usage.objects.create(request_id=f"req_{n:032x}", user=caller.user, model="sim-small",
                             status=Usage.Status.COMPLETED, started_at=now - timedelta(minutes=n),
                             prompt_tokens=20, completion_tokens=980 + n, duration_ms=2000 + n,
                             time_to_first_token_ms=150, day=now.date(), month=now.strftime("%Y-%m"))
    plan = Plan.objects.get(pk=caller.plan.pk)
    AuditEntry.entry(operator, AuditEntry.Action.LIMITS_CHANGED, plan, {"tokens_per_day": 10_000},
                     {"tokens_per_day": 1_000_000}).save()
    page = sign_in(open_page({"width": 1280, "height": 800}), operator, "/admin/quotas/usage/")

    row = page.locator("#result_list tbody tr", has_text="req_01234567…")
    expect(row.locator(".sluice-badge")).to_have_text("upstream error")
    cells = row.locator("td, th").all_inner_texts()
    assert "13,234" in cells and "1.5 s\nfirst 0.42 s" in cells and f"{caller.user.username}\nsim-large" in cells
    assert fits(page)
    screenshot(page, "admin-ledger", full_page=False)

    page.goto("/admin/quotas/userquota/")
    suspended_row = page.locator("#result_list tbody tr", has_text=paused.user.username)
    expect(suspended_row.locator(".sluice-badge")).to_have_text("suspended")
    assert suspended_row.locator("img").count() == 0  # not Django's green tick
    expect(page.locator("#result_list tbody tr", has_text=caller.user.username)).to_contain_text("0 of 1,000,000")
    assert fits(page)
    screenshot(page, "admin-quotas", full_page=False)

    page.goto("/admin/quotas/plan/")
    expect(page.locator("#result_list tbody tr", has_text=caller.plan.name)).to_contain_text("1,000,000")
    assert fits(page)

    page.goto("/admin/quotas/auditentry/")
    entry = page.locator("#result_list tbody tr").first
    expect(entry).to_contain_text("tokens_per_day: 10,000 → 1,000,000")
    assert fits(page)
    screenshot(page, "admin-audit", full_page=False)
    entry.get_by_role("link", name=plan.name).click()
    page.wait_for_url(f"**/admin/quotas/plan/{plan.pk}/change/", wait_until="domcontentloaded")
