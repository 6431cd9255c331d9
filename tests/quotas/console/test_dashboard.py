"""quotas/console/dashboard.py: the usage dashboard page, its chart, and the admin's usage figures."""

from datetime import UTC, date, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from quotas.console.dashboard import DAYS, bar_chart, with_window_usage
from quotas.models import DailyUsage, Plan, Usage, UserQuota


def ledger(user, when, day, month, tokens=0, status=Usage.Status.COMPLETED, reason="", counted=True):
    return Usage.objects.create(request_id=f"req-{Usage.objects.count()}", user=user, model="sim-small",
                                status=status, reason=reason, started_at=when, completion_tokens=tokens,
                                charged_tokens=0 if status == Usage.Status.STREAMING else tokens, counted=counted,
                                day=day, month=month)


def test_bar_chart_scales_the_busiest_day_to_the_plot_and_fills_empty_days():
    since = date(2026, 3, 1)
    totals = {date(2026, 3, 3): {"prompt": 100, "completion": 300}, date(2026, 3, 4): {"prompt": 50, "completion": 0}}
    chart = bar_chart(since, totals, days=6, width=600, height=120)
    assert [bar.date.day for bar in chart.bars] == [1, 2, 3, 4, 5, 6]
    assert chart.max_tokens == 400 and chart.plot_height == 100
    busiest = chart.bars[2]
    assert (busiest.prompt_height, busiest.completion_height, busiest.completion_y) == (25, 75, 0)
    assert chart.bars[3].prompt_height == 12.5 and chart.bars[0].prompt_height == 0
    assert [bar.label for bar in chart.bars] == ["03-01", "", "", "", "", "03-06"]  # every fifth, from today back
    assert (chart.bars[1].x, chart.bars[1].width) == (102, 96)
    assert bar_chart(since, {}, days=3).max_tokens == 0  # no usage: flat, no division by zero


def test_window_usage_follows_each_users_timezone(django_user_model):
    # 23:30 UTC on 31 March: already 1 April in Kiritimati (UTC+14), still 31 March in Adak.
    now = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)
    plan = Plan.objects.create(name="p")
    users = {}
    for zone in ("UTC", "Pacific/Kiritimati", "America/Adak"):
        users[zone] = django_user_model.objects.create(username=zone)
        UserQuota.objects.create(user=users[zone], plan=plan, timezone=zone)
    ledger(users["UTC"], now, date(2026, 3, 31), "2026-03", tokens=10)
    ledger(users["UTC"], now, date(2026, 3, 30), "2026-03", tokens=5)
    ledger(users["UTC"], now, date(2026, 3, 31), "2026-03", tokens=1000, counted=False)
    ledger(users["Pacific/Kiritimati"], now, date(2026, 4, 1), "2026-04", tokens=20)
    ledger(users["Pacific/Kiritimati"], now, date(2026, 3, 31), "2026-03", tokens=7)  # its yesterday, last month
    ledger(users["America/Adak"], now, date(2026, 3, 31), "2026-03", tokens=30)
    quotas = with_window_usage(UserQuota.objects.select_related("user"), now)
    assert {q.user.username: (q.day_used, q.month_used) for q in quotas} == {
        "UTC": (10, 15), "Pacific/Kiritimati": (20, 20), "America/Adak": (30, 30)}


@pytest.fixture
def month_of_usage(django_user_model):
    """Two users, two models, rollups over the last days, refusals and upstream errors in the ledger."""
    alice, bob = (django_user_model.objects.create(username=name) for name in ("alice", "bob"))
    today, now = timezone.now().date(), timezone.now()
    for back in range(5):
        DailyUsage.objects.create(user=alice, model="sim-large", date=today - timedelta(days=back), requests=2,
                                  prompt_tokens=100, completion_tokens=900)
    DailyUsage.objects.create(user=bob, model="sim-small", date=today, requests=1, prompt_tokens=10,
                              completion_tokens=40, refusals=3, upstream_errors=1)
    DailyUsage.objects.create(user=bob, model="sim-small", date=today - timedelta(days=DAYS), requests=99,
                              prompt_tokens=99_999)  # too old to show
    for reason in ("rate_limit_exceeded", "rate_limit_exceeded", "insufficient_quota"):
        ledger(bob, now, today, "x", status=Usage.Status.REJECTED, reason=reason)
    ledger(bob, now, today, "x", status=Usage.Status.QUOTA_EXHAUSTED, reason="insufficient_quota")
    ledger(bob, now, today, "x", status=Usage.Status.UPSTREAM_ERROR, reason="upstream_timeout")
    ledger(bob, now - timedelta(days=DAYS + 1), today, "x", status=Usage.Status.UPSTREAM_ERROR, reason="old")
    return alice, bob


def test_dashboard_shows_chart_top_users_models_refusals_and_errors(admin_client, month_of_usage,
                                                                   django_assert_max_num_queries):
    with django_assert_max_num_queries(9):
        response = admin_client.get(reverse("admin:quotas_usage_dashboard"))
    assert response.status_code == 200
    context = response.context
    assert len(context["chart"].bars) == DAYS and context["chart"].bars[-1].date == timezone.now().date()
    assert context["chart"].max_tokens == 1050  # today: alice's 1000 and bob's 50
    assert context["summary"]["tokens"] == 5 * 1000 + 50 and context["summary"]["refusals"] == 3
    assert [(r["name"], r["tokens"]) for r in context["top_users"]] == [("alice", 5000), ("bob", 50)]
    assert [(r["name"], r["requests"]) for r in context["top_models"]] == [("sim-large", 10), ("sim-small", 1)]
    refusals = [(r["status"], r["reason"], r["requests"]) for r in context["refusals"]]
    assert refusals[0] == ("rejected", "rate_limit_exceeded", 2)
    assert sorted(refusals[1:]) == [("quota_exhausted", "insufficient_quota", 1), ("rejected", "insufficient_quota", 1)]
    assert [(r["reason"], r["requests"]) for r in context["upstream_errors"]] == [("upstream_timeout", 1)]
    page = response.content.decode()
    assert page.count('<rect class="completion"') == DAYS and "<svg" in page and "cdn" not in page.lower()
    assert 'id="live-rows"' in page and "/ws/admin/live/" in page
    assert "(cut mid-stream)" in page and "5,050" in page


def test_dashboard_is_linked_from_the_admin_index_and_the_ledger(admin_client):
    url = reverse("admin:quotas_usage_dashboard")
    assert url in admin_client.get(reverse("admin:index")).content.decode()
    assert url in admin_client.get(reverse("admin:quotas_usage_changelist")).content.decode()


def test_staff_with_the_ledger_view_permission_may_see_the_dashboard(client, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_usage"))
    client.force_login(staff)
    assert client.get(reverse("admin:quotas_usage_dashboard")).status_code == 200


def test_ledger_date_drilldown_is_the_calendar_between_first_and_last_row(admin_client, django_user_model):
    user = django_user_model.objects.create(username="u")
    url = reverse("admin:quotas_usage_changelist")
    assert admin_client.get(url).context["calendar_hierarchy"]["show"] is False  # an empty ledger
    for when in (datetime(2026, 1, 29, 12, tzinfo=UTC), datetime(2026, 1, 31, 12, tzinfo=UTC),
                 datetime(2026, 3, 2, 12, tzinfo=UTC)):
        ledger(user, when, when.date(), "x")

    def hierarchy(**params):
        return admin_client.get(url, params).context["calendar_hierarchy"]

    assert [c["title"] for c in hierarchy()["choices"]] == ["January 2026", "February 2026", "March 2026"]
    january = hierarchy(started_at__year=2026, started_at__month=1)
    assert [c["title"] for c in january["choices"]] == ["January 29", "January 30", "January 31"]
    assert "started_at__day=31" in january["choices"][2]["link"]
    day = hierarchy(started_at__year=2026, started_at__month=3, started_at__day=2)
    assert day["choices"] == [{"title": "March 2"}] and "started_at__month=3" in day["back"]["link"]
    ledger(user, datetime(2025, 6, 1, tzinfo=UTC), date(2025, 6, 1), "x")
    assert [c["title"] for c in hierarchy()["choices"]] == ["2025", "2026"]
    assert "All dates" in admin_client.get(url, {"started_at__year": 2026}).content.decode()
