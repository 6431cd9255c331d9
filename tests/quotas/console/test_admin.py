"""quotas/console/admin.py: every admin page and action, as an operator uses them (the test client), and
their effect on a real gateway process (the `sim` fixture) where it matters: a suspension, a
revoked key or a reset window applies from the next request on, without a restart.
"""

from datetime import timedelta
from html.parser import HTMLParser

import httpx2
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from quotas.models import ApiKey, AuditEntry, Plan, Usage, UserQuota
from quotas.domain.policy import Limits, calendar_windows
from quotas.domain.windows import window_specs
from quotas.store import get_store, reset_stores
from tests.support.gateways import gateway_server

Action = AuditEntry.Action


class _FormFields(HTMLParser):
    """What a browser would submit from each POST form of a page (inputs, selects, textareas)."""

    def __init__(self):
        super().__init__()
        self.forms, self.data, self.select, self.textarea = [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and attrs.get("method", "").lower() == "post":
            self.data = {}
            self.forms.append(self.data)
        name = attrs.get("name")
        if tag == "option" and self.select and "selected" in attrs:
            self.data[self.select].append(attrs.get("value", ""))
        if self.data is None or not name:
            return
        if tag == "input" and attrs.get("type") not in ("submit", "button", "file", "image"):
            if attrs.get("type") in ("checkbox", "radio"):
                if "checked" in attrs:
                    self.data.setdefault(name, []).append(attrs.get("value", "on"))
            else:
                self.data.setdefault(name, []).append(attrs.get("value", ""))
        elif tag == "select":
            self.select = name
            self.data.setdefault(name, [])
        elif tag == "textarea":
            self.textarea = name
            self.data[name] = [""]

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None
        elif tag == "textarea" and self.textarea:
            # Browsers drop the newline that follows <textarea>.
            self.data[self.textarea] = [self.data[self.textarea][0].removeprefix("\n")]
            self.textarea = None
        elif tag == "form":
            self.data = None

    def handle_data(self, data):
        if self.textarea:
            self.data[self.textarea][0] += data


def form_data(response, **changes):
    """The page's main form (the one with the most fields; not the logout form) as a browser posts it."""
    parser = _FormFields()
    parser.feed(response.content.decode())
    fields = max(parser.forms, key=len)
    data = {name: values if len(values) != 1 else values[0] for name, values in fields.items()}
    data.update(changes)
    return {name: value for name, value in data.items() if value is not None}


def row(user, tokens, when=None, status=Usage.Status.COMPLETED, limits=None, **fields):
    """A ledger row of `tokens` completion tokens (charged, once settled), in the windows the user's timezone gives
    `when`."""
    when = when or timezone.now()
    day, month = calendar_windows(limits or Limits.combine(user.quota.plan, user.quota), when)
    charged = 0 if status == Usage.Status.STREAMING else tokens
    return Usage.objects.create(request_id=f"req_{Usage.objects.count()}_{user.pk}_{when.timestamp()}", user=user,
                                model="sim-small", status=status, started_at=when, completion_tokens=tokens,
                                charged_tokens=charged, day=day.start.date(), month=month.key, **fields)


def act(client, model, action, objects, **extra):
    url = reverse(f"admin:quotas_{model}_changelist")
    return client.post(url, {"action": action, "_selected_action": [o.pk for o in objects], **extra}, follow=True)


@pytest.fixture
def operator(admin_user):
    return admin_user


# Plans -----------------------------------------------------------------------------------------


def test_plan_changelist_counts_users_and_searches(admin_client, make_user):
    caller = make_user(tokens_per_day=1234)
    Plan.objects.create(name="enterprise")
    response = admin_client.get(reverse("admin:quotas_plan_changelist"), {"q": caller.plan.name})
    assert response.status_code == 200
    assert [p.name for p in response.context["cl"].result_list] == [caller.plan.name]
    assert response.context["cl"].result_list[0].user_count == 1
    assert "1,234" in response.content.decode()


def test_plan_add_and_change_are_audited(admin_client, operator):
    add = admin_client.get(reverse("admin:quotas_plan_add"))
    admin_client.post(reverse("admin:quotas_plan_add"), form_data(add, name="team"))  # no model ticked: every one
    plan = Plan.objects.get(name="team")
    url = reverse("admin:quotas_plan_change", args=[plan.pk])
    response = admin_client.post(url, form_data(admin_client.get(url), tokens_per_day="5000",
                                                allowed_models=["sim-small"]))
    assert response.status_code == 302
    plan.refresh_from_db()
    assert (plan.tokens_per_day, plan.allowed_models) == (5000, ["sim-small"])
    created, changed = AuditEntry.objects.order_by("at", "id")
    assert (created.action, created.actor, created.new["tokens_per_day"]) == (Action.CREATED, operator, 200_000)
    assert changed.action == Action.LIMITS_CHANGED
    assert changed.old == {"tokens_per_day": 200_000, "allowed_models": []}
    assert changed.new == {"tokens_per_day": 5000, "allowed_models": ["sim-small"]}


# User quotas -----------------------------------------------------------------------------------


def test_quota_changelist_shows_window_usage_remaining_and_reset(admin_client, make_user):
    caller = make_user(tokens_per_day=1000, tokens_per_month=5000)
    UserQuota.objects.filter(user=caller.user).update(tokens_per_day=2000)  # an override
    user = get_user_model().objects.get(pk=caller.user.pk)
    now = timezone.now()
    row(user, 300)
    row(user, 500, counted=False)  # reset by an operator earlier
    last_month = calendar_windows(Limits.combine(user.quota.plan, user.quota), now)[1].start - timedelta(days=1)
    row(user, 4000, when=last_month)
    response = admin_client.get(reverse("admin:quotas_userquota_changelist"))
    quota = response.context["cl"].result_list[0]
    assert (quota.day_used, quota.month_used) == (300, 300)
    page = response.content.decode()
    assert "300 of 2,000" in page and "1,700" in page  # the override, not the plan's 1,000
    assert "300 of 5,000" in page and "4,700" in page
    assert "hour" in page or "minute" in page  # the day resets within 24 h
    assert '60/min, 4 at once,<div class="sluice-sub">4,096 per request</div>' in page
    assert '<span title="1,700 left">300 of 2,000</span><div class="sluice-sub">15% · resets in' in page


def test_quota_form_shows_the_plans_value_beside_each_blank_override(admin_client, make_user):
    caller = make_user(tokens_per_day=10_000, requests_per_minute=30, allowed_models=["sim-small"])
    quota = UserQuota.objects.get(user=caller.user)
    UserQuota.objects.filter(pk=quota.pk).update(requests_per_minute=5)  # an override: its plan value is still shown
    page = admin_client.get(reverse("admin:quotas_userquota_change", args=[quota.pk])).content.decode()
    assert 'placeholder="plan: 10,000"' in page and 'placeholder="plan: 3,000,000"' in page
    assert 'data-plan-value="id_requests_per_minute">plan: 30</span>' in page
    assert "None ticked: the plan&#x27;s models." in page and ">plan: sim-small</span>" in page
    assert "data-plan-values=" in page and "plan_values.js" not in page and "data-plan-select=\"id_plan\"" in page
    # The user's own page: the inline's fields are prefixed, and follow the inline's plan select.
    page = admin_client.get(reverse("admin:auth_user_change", args=[caller.user.pk])).content.decode()
    assert 'data-plan-select="id_quota-0-plan"' in page and 'placeholder="plan: 10,000"' in page


def test_a_new_quota_starts_on_the_default_plan_and_shows_its_values(admin_client):
    Plan.objects.create(name="basic", is_default=True, tokens_per_day=1234)
    Plan.objects.create(name="other", tokens_per_day=99)
    response = admin_client.get(reverse("admin:quotas_userquota_add"))
    assert response.context["adminform"].form["plan"].value() == Plan.objects.get(name="basic").pk
    assert 'placeholder="plan: 1,234"' in response.content.decode()


def test_the_site_is_branded_sluice(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "<title>Operations | Sluice admin</title>" in page
    assert '<div id="site-name"><a href="/admin/">Sluice</a></div>' in page and "Django administration" not in page


def test_quota_changelist_searches_and_filters(admin_client, make_user):
    first, second = make_user(), make_user()
    get_user_model().objects.filter(pk=first.user.pk).update(email="ops-first@example.com")
    UserQuota.objects.filter(user=second.user).update(suspended=True)
    url = reverse("admin:quotas_userquota_changelist")

    def users(**params):
        return [q.user.username for q in admin_client.get(url, params).context["cl"].result_list]

    assert users(q="ops-first@") == [first.user.username]
    assert users(q=second.user.username) == [second.user.username]
    assert users(suspended__exact="1") == [second.user.username]
    assert users(plan__id__exact=first.plan.pk) == [first.user.username]


def test_quota_changelist_queries_do_not_grow_with_users(admin_client, django_user_model,
                                                          django_assert_max_num_queries):
    plans = [Plan.objects.create(name="small"), Plan.objects.create(name="large")]
    for n, zone in enumerate(["UTC", "Pacific/Kiritimati", "America/Adak"] * 10):
        user = django_user_model.objects.create(username=f"many-{n}", email=f"many-{n}@example.com")
        UserQuota.objects.create(user=user, plan=plans[n % 2], timezone=zone)
        row(user, 10)
    with django_assert_max_num_queries(10):
        response = admin_client.get(reverse("admin:quotas_userquota_changelist"))
    assert len(response.context["cl"].result_list) == 30
    assert {quota.day_used for quota in response.context["cl"].result_list} == {10}  # each in its own zone


def test_change_plan_asks_for_the_plan_then_moves_and_audits(admin_client, make_user, operator):
    first, second = make_user(), make_user()
    pro = Plan.objects.create(name="pro")
    quotas = list(UserQuota.objects.filter(user__in=[first.user, second.user]))
    form = act(admin_client, "userquota", "change_plan", quotas)
    assert form.templates[0].name == "admin/quotas/userquota/change_plan.html"
    assert first.user.username in form.content.decode()
    done = act(admin_client, "userquota", "change_plan", quotas, apply="1", plan=pro.pk)
    assert "2 user(s) moved to pro" in done.content.decode()
    assert set(UserQuota.objects.values_list("plan__name", flat=True)) == {"pro"}
    entries = AuditEntry.objects.filter(action=Action.PLAN_CHANGED)
    assert {(e.old["plan"], e.new["plan"], e.actor_id) for e in entries} == {
        (first.plan.name, "pro", operator.pk), (second.plan.name, "pro", operator.pk)}


def test_suspend_and_unsuspend_apply_to_the_next_request(admin_client, make_user, sim):
    caller = make_user()
    quota = UserQuota.objects.get(user=caller.user)
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {caller.key}"}
    assert httpx2.post(sim.api_url + "/chat/completions", json=body, headers=headers).status_code == 200
    act(admin_client, "userquota", "suspend", [quota])
    refused = httpx2.post(sim.api_url + "/chat/completions", json=body, headers=headers)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "account_suspended")
    act(admin_client, "userquota", "unsuspend", [quota])
    assert httpx2.post(sim.api_url + "/chat/completions", json=body, headers=headers).status_code == 200
    assert list(AuditEntry.objects.order_by("id").values_list("action", "old", "new")) == [
        (Action.SUSPENDED, {"suspended": False}, {"suspended": True}),
        (Action.UNSUSPENDED, {"suspended": True}, {"suspended": False})]


def test_reset_uncounts_the_current_windows_and_drops_their_counters(admin_client, make_user, operator):
    caller = make_user(tokens_per_day=1000)
    user = get_user_model().objects.get(pk=caller.user.pk)
    now = timezone.now()
    limits = Limits.combine(user.quota.plan, user.quota)
    today, running = row(user, 300), row(user, 0, status=Usage.Status.STREAMING, reserved_tokens=40)
    older = row(user, 70, when=calendar_windows(limits, now)[1].start - timedelta(days=1))
    _, specs = window_specs(user.pk, limits, now)
    store = get_store()
    for spec in specs:
        async_to_sync(store.seed)(spec, 300, {}, now.timestamp(), 30)

    act(admin_client, "userquota", "reset_windows", [user.quota])

    counted = dict(Usage.objects.values_list("pk", "counted"))
    assert counted == {today.pk: False, running.pk: True, older.pk: True}
    assert all(async_to_sync(store.usage)(spec.key, now.timestamp()) is None for spec in specs)
    entry = AuditEntry.objects.get(action=Action.WINDOW_RESET)
    assert (entry.actor, entry.old["used_today"], entry.new["used_today"]) == (operator, 300, 0)


@pytest.mark.redis
def test_a_reset_window_admits_the_user_again(admin_client, make_user, redis_url):
    """Gateway and admin share the counters through Redis: the reset lifts a spent daily quota."""
    caller = make_user(tokens_per_day=40)
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
    headers = {"Authorization": f"Bearer {caller.key}"}
    redis_settings = {"SLUICE_COUNTER_STORE": "quotas.store.redis.RedisStore", "REDIS_URL": redis_url,
                      "CACHES": {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url}}}
    with gateway_server(REDIS_URL=redis_url) as gateway, override_settings(**redis_settings):
        reset_stores()
        url = gateway.api_url + "/chat/completions"
        assert httpx2.post(url, json=body, headers=headers).status_code == 200
        spent = httpx2.post(url, json=body, headers=headers)
        assert spent.json()["error"]["code"] == "insufficient_quota"
        act(admin_client, "userquota", "reset_windows", [UserQuota.objects.get(user=caller.user)])
        assert httpx2.post(url, json=body, headers=headers).status_code == 200
    reset_stores()


def test_quota_change_form_is_audited_with_old_and_new_limits(admin_client, make_user):
    caller = make_user()
    quota = UserQuota.objects.get(user=caller.user)
    url = reverse("admin:quotas_userquota_change", args=[quota.pk])
    admin_client.post(url, form_data(admin_client.get(url), requests_per_minute="7", timezone="Europe/Paris"))
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.old, entry.new) == (
        Action.LIMITS_CHANGED, {"requests_per_minute": None, "timezone": "UTC"},
        {"requests_per_minute": 7, "timezone": "Europe/Paris"})
    assert entry.target_type == "quotas.userquota" and entry.target_id == str(quota.pk)


def test_user_page_edits_the_quota_inline_and_audits_it(admin_client, make_user):
    caller = make_user()
    url = reverse("admin:auth_user_change", args=[caller.user.pk])
    page = admin_client.get(url)
    assert "Quota (none: the default plan)" in page.content.decode()
    response = admin_client.post(url, form_data(page, **{"quota-0-suspended": "on"}))
    assert response.status_code == 302, response.context and response.context["errors"]
    assert UserQuota.objects.get(user=caller.user).suspended
    assert AuditEntry.objects.get().action == Action.SUSPENDED
    response = admin_client.post(url, form_data(admin_client.get(url), **{"quota-0-DELETE": "on"}))
    assert not UserQuota.objects.filter(user=caller.user).exists()
    assert AuditEntry.objects.latest("id").action == Action.REMOVED


# API keys --------------------------------------------------------------------------------------


def test_key_is_shown_once_at_creation_and_never_its_hash(admin_client, make_user, operator):
    caller = make_user()
    add = admin_client.get(reverse("admin:quotas_apikey_add"))
    created = admin_client.post(reverse("admin:quotas_apikey_add"), form_data(add, user=caller.user.pk, name="ci"))
    key = ApiKey.objects.get(user=caller.user, name="ci")
    # To the one-time page by a redirect, so that a refresh repeats a GET and issues nothing (issue 19, item 7).
    issued = reverse("admin:quotas_apikey_issued", args=[key.pk])
    assert (created.status_code, created["Location"]) == (302, issued)
    response = admin_client.get(issued)
    raw = response.context["raw_key"]
    assert raw.startswith(ApiKey.PREFIX) and raw in response.content.decode() and key.matches(raw)
    assert response["Cache-Control"].startswith("max-age=0")  # never cached (admin pages are never_cache)
    assert "sluice.issued_keys" not in admin_client.session  # taken out of the session as it was shown
    again = admin_client.get(issued)
    assert again.status_code == 200 and again.context["raw_key"] is None and raw not in again.content.decode()
    assert "was shown once" in again.content.decode()
    assert ApiKey.objects.filter(user=caller.user).count() == 2  # make_user's and this one: no second key
    for page in (reverse("admin:quotas_apikey_changelist"), reverse("admin:quotas_apikey_change", args=[key.pk])):
        content = admin_client.get(page).content.decode()
        assert key.prefix in content and key.hashed_key not in content and raw not in content
    entry = AuditEntry.objects.get(action=Action.KEY_CREATED)
    assert (entry.actor, entry.new["prefix"], entry.new["name"]) == (operator, key.prefix, "ci")


def test_key_change_edits_name_and_expiry_only(admin_client, make_user):
    key = ApiKey.objects.get(user=make_user().user)
    url = reverse("admin:quotas_apikey_change", args=[key.pk])
    page = admin_client.get(url)
    expires = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    admin_client.post(url, form_data(page, name="renamed", expires_at_0=expires.strftime("%Y-%m-%d"),
                                     expires_at_1=expires.strftime("%H:%M:%S"), revoked_at="2000-01-01"))
    key.refresh_from_db()
    assert (key.name, key.expires_at, key.revoked_at) == ("renamed", expires, None)


def test_revoked_key_is_refused_from_the_next_request(admin_client, make_user, sim, operator):
    caller = make_user()
    key = ApiKey.objects.get(user=caller.user)
    headers = {"Authorization": f"Bearer {caller.key}"}
    assert httpx2.get(sim.api_url + "/models", headers=headers).status_code == 200
    response = act(admin_client, "apikey", "revoke", [key])
    assert "1 key(s) revoked" in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    refused = httpx2.get(sim.api_url + "/models", headers=headers)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    assert AuditEntry.objects.get(action=Action.KEY_REVOKED).actor == operator
    act(admin_client, "apikey", "revoke", [key])  # already revoked: nothing changes, nothing audited
    assert AuditEntry.objects.filter(action=Action.KEY_REVOKED).count() == 1


# The ledger and the audit trail ----------------------------------------------------------------


def test_ledger_is_read_only(admin_client, make_user):
    record = row(get_user_model().objects.get(pk=make_user().user.pk), 5)
    assert admin_client.get(reverse("admin:quotas_usage_add")).status_code == 403
    change = reverse("admin:quotas_usage_change", args=[record.pk])
    assert "Save" not in admin_client.get(change).content.decode()
    assert admin_client.post(change, {"completion_tokens": 0}).status_code == 403
    assert admin_client.post(reverse("admin:quotas_usage_delete", args=[record.pk])).status_code == 403
    record.refresh_from_db()
    assert record.completion_tokens == 5


def test_ledger_filters_search_and_date_drilldown(admin_client, make_user):
    from quotas.models import DailyUsage

    first, second = (get_user_model().objects.get(pk=make_user().user.pk) for _ in range(2))
    done, refused = row(first, 5), row(second, 0, status=Usage.Status.REJECTED, reason="rate_limit_exceeded")
    Usage.objects.filter(pk=refused.pk).update(model="sim-large")
    DailyUsage.objects.create(user=second, model="sim-large", date=timezone.now().date())
    url = reverse("admin:quotas_usage_changelist")

    def ids(**params):
        response = admin_client.get(url, params)
        assert response.status_code == 200
        return [r.request_id for r in response.context["cl"].result_list]

    assert ids(status__exact="rejected") == [refused.request_id]
    assert ids(model="sim-large") == [refused.request_id]
    assert ids(q=first.username) == [done.request_id]
    assert ids(q=refused.request_id) == [refused.request_id]
    assert ids(**{"user__id__exact": second.pk}) == [refused.request_id]
    now = timezone.now()
    assert len(ids(started_at__year=now.year, started_at__month=now.month, started_at__day=now.day)) == 2
    assert "sim-large" in admin_client.get(url).content.decode()  # the model filter's choices


def test_ledger_changelist_queries_stay_bounded_at_scale(admin_client, django_user_model,
                                                        django_assert_max_num_queries):
    users = [django_user_model.objects.create(username=f"bulk-{n}") for n in range(20)]
    now = timezone.now()
    day, month = now.date(), now.strftime("%Y-%m")
    Usage.objects.bulk_create(
        (Usage(request_id=f"bulk-{i}", user=users[i % 20], model="sim-small", status=Usage.Status.COMPLETED,
               started_at=now - timedelta(seconds=i), completion_tokens=i % 97, charged_tokens=i % 97, day=day,
               month=month)
         for i in range(20_000)), batch_size=2000)
    url = reverse("admin:quotas_usage_changelist")
    now_parts = {"started_at__year": now.year, "started_at__month": now.month}
    for params in ({}, {"status__exact": "completed"}, {"q": users[3].username}, {"model": "sim-small"}, now_parts):
        with django_assert_max_num_queries(8):
            response = admin_client.get(url, params)
        assert len(response.context["cl"].result_list) == 100
    assert admin_client.get(url, {"model": "sim-large"}).context["cl"].result_count == 0


def test_audit_trail_is_listed_read_only(admin_client, make_user, operator):
    quota = UserQuota.objects.get(user=make_user().user)
    act(admin_client, "userquota", "suspend", [quota])
    entry = AuditEntry.objects.get()
    response = admin_client.get(reverse("admin:quotas_auditentry_changelist"), {"action__exact": "suspended"})
    assert "<b>suspended:</b> no → yes" in response.content.decode()
    assert admin_client.get(reverse("admin:quotas_auditentry_add")).status_code == 403
    assert admin_client.post(reverse("admin:quotas_auditentry_delete", args=[entry.pk])).status_code == 403


# Who may use the admin -------------------------------------------------------------------------


ADMIN_PAGES = ["admin:quotas_plan_changelist", "admin:quotas_userquota_changelist", "admin:quotas_apikey_changelist",
               "admin:quotas_usage_changelist", "admin:quotas_auditentry_changelist", "admin:quotas_apikey_add",
               "admin:quotas_usage_dashboard"]


@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_non_staff_are_sent_to_the_login_page(client, make_user, page):
    client.force_login(make_user().user)
    response = client.get(reverse(page))
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_staff_without_permissions_are_refused(client, django_user_model, page):
    staff = django_user_model.objects.create_user("clerk", password="x", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse(page)).status_code == 403
