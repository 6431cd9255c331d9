"""quotas/console/dashboard.py: the usage dashboard page (its period, figures, charts and links), and the admin's
usage figures."""

from datetime import UTC, date, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from quotas.console.dashboard import Period, first_token_percentiles, period_from, with_window_usage
from quotas.models import DailyUsage, Plan, Usage, UserQuota

DAYS = 30


def ledger(user, when, day, month, tokens=0, status=Usage.Status.COMPLETED, reason="", counted=True, model="sim-small",
           ttft_ms=None):
    return Usage.objects.create(request_id=f"req-{Usage.objects.count()}", user=user, model=model,
                                status=status, reason=reason, started_at=when, completion_tokens=tokens,
                                charged_tokens=0 if status == Usage.Status.STREAMING else tokens, counted=counted,
                                day=day, month=month, time_to_first_token_ms=ttft_ms)


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
    """Two users, two models, rollups over the last days, refusals (one before any model was chosen), a cut, and
    failures in the ledger."""
    alice, bob = (django_user_model.objects.create(username=name) for name in ("alice", "bob"))
    today, now = timezone.now().date(), timezone.now()
    for back in range(5):
        DailyUsage.objects.create(user=alice, model="sim-large", date=today - timedelta(days=back), requests=2,
                                  prompt_tokens=100, completion_tokens=900)
    DailyUsage.objects.create(user=bob, model="sim-small", date=today, requests=4, prompt_tokens=10,
                              completion_tokens=40, refusals=2, upstream_errors=1)
    DailyUsage.objects.create(user=bob, model="", date=today, requests=1, refusals=1)  # refused before a model
    DailyUsage.objects.create(user=bob, model="sim-small", date=today - timedelta(days=DAYS), requests=99,
                              prompt_tokens=99_999)  # too old to show
    ledger(bob, now, today, "x", status=Usage.Status.REJECTED, reason="rate_limit_exceeded", model="")
    ledger(bob, now, today, "x", status=Usage.Status.REJECTED, reason="rate_limit_exceeded")
    ledger(bob, now, today, "x", status=Usage.Status.REJECTED, reason="insufficient_quota")
    ledger(bob, now, today, "x", status=Usage.Status.QUOTA_EXHAUSTED, reason="insufficient_quota")
    ledger(bob, now, today, "x", status=Usage.Status.UPSTREAM_ERROR, reason="upstream_timeout")
    ledger(bob, now, today, "x", status=Usage.Status.WORKER_LOST, reason="worker_lost")
    ledger(bob, now - timedelta(days=DAYS + 1), today, "x", status=Usage.Status.UPSTREAM_ERROR, reason="old")
    return alice, bob


def test_dashboard_shows_chart_top_users_models_refusals_and_errors(admin_client, month_of_usage,
                                                                   django_assert_max_num_queries):
    with django_assert_max_num_queries(10):
        response = admin_client.get(reverse("admin:quotas_usage_dashboard"))
    assert response.status_code == 200
    context = response.context
    period, tokens = context["period"], context["charts"]["tokens"]["chart"]
    assert (period.days, period.last, period.hourly) == (DAYS, timezone.now().date(), False)
    assert len(tokens.columns) == DAYS and tokens.peak == 1200  # today: alice's 1000 and bob's 50, on a nice scale
    assert tokens.labels[-1].text == timezone.now().strftime("%m-%d") and tokens.labels[-1].align == "end"
    summary = context["summary"]
    assert summary["tokens"] == 5 * 1000 + 50 and summary["requests"] == 5 * 2 + 4 + 1
    # The cards add up the tables' rows: 3 refused (by reason), 1 cut, 2 failed.
    assert (summary["refused"], summary["cut"], summary["failed"]) == (3, 1, 2)
    assert [(r["reason"], r["requests"]) for r in context["refusals"]] == [("rate_limit_exceeded", 2),
                                                                           ("insufficient_quota", 1)]
    assert sum(r["requests"] for r in context["refusals"]) == summary["refused"] and context["cut"] == 1
    assert sorted((r["status"], r["reason"]) for r in context["errors"]) == [
        ("upstream_error", "upstream_timeout"), ("worker_lost", "worker_lost")]
    assert [(r["name"], r["tokens"]) for r in context["top_users"]] == [("alice", 5000), ("bob", 50)]
    # No blank row for the refusal that had no model.
    assert [(r["name"], r["requests"]) for r in context["top_models"]] == [("sim-large", 10), ("sim-small", 4)]
    page = response.content.decode()
    assert page.count('<rect class="completion"') == 5 and "<svg" in page and "cdn" not in page.lower()
    assert 'id="live-rows"' in page and "/ws/admin/live/" in page and 'data-stale-seconds="5"' in page
    assert "cut at the quota mid-stream" in page and "5,050" in page


def test_top_rows_and_reasons_link_to_the_ledger_filtered_to_them_and_the_period(admin_client, month_of_usage):
    alice, bob = month_of_usage
    context = admin_client.get(reverse("admin:quotas_usage_dashboard"), {"range": "7d"}).context
    url = reverse("admin:quotas_usage_changelist")

    def rows(link):
        assert link.startswith(url + "?")
        response = admin_client.get(link)
        assert response.status_code == 200
        return [(r.user.username, r.model, r.status) for r in response.context["cl"].result_list]

    bobs = next(r["url"] for r in context["top_users"] if r["name"] == "bob")
    assert len(rows(bobs)) == 6 and {user for user, _, _ in rows(bobs)} == {"bob"}  # not the one 31 days old
    small = next(r["url"] for r in context["top_models"] if r["name"] == "sim-small")
    assert {model for _, model, _ in rows(small)} == {"sim-small"}
    limited = next(r["url"] for r in context["refusals"] if r["reason"] == "rate_limit_exceeded")
    assert sorted(rows(limited)) == [("bob", "", "rejected"), ("bob", "sim-small", "rejected")]
    assert rows(context["cut_url"]) == [("bob", "sim-small", "quota_exhausted")]


def test_period_is_a_preset_or_chosen_dates_never_past_today():
    today = date(2026, 3, 31)
    assert period_from({}, today) == Period(date(2026, 3, 2), today, "30d")
    assert period_from({"range": "today"}, today) == Period(today, today, "today")
    assert period_from({"range": "today"}, today).hourly
    assert period_from({"range": "7d"}, today).first == date(2026, 3, 25)
    assert period_from({"range": "nonsense"}, today).preset == "30d"
    assert period_from({"from": "2026-03-10", "to": "2026-03-12"}, today) == Period(date(2026, 3, 10),
                                                                                   date(2026, 3, 12), "")
    assert period_from({"from": "2026-03-12", "to": "2026-03-10"}, today).first == date(2026, 3, 10)  # swapped
    assert period_from({"from": "2026-03-20"}, today) == Period(date(2026, 3, 20), today, "")
    assert period_from({"from": "2027-01-01", "to": "2027-02-01"}, today) == Period(today, today, "")
    assert period_from({"from": "2020-01-01", "to": "2026-03-31"}, today).days == 366
    assert period_from({"from": "bad", "to": "worse"}, today).preset == "30d"
    one_day = period_from({"from": "2026-03-10", "to": "2026-03-10"}, today)
    buckets = one_day.buckets()
    assert one_day.hourly and len(buckets) == 24
    assert (buckets[0], buckets[-1]) == (datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 10, 23, tzinfo=UTC))
    assert one_day.end == datetime(2026, 3, 11, tzinfo=UTC)


def test_today_is_shown_by_hour_from_the_ledger(admin_client, django_user_model):
    user = django_user_model.objects.create(username="hourly")
    today = timezone.now().astimezone(UTC).date()
    midnight = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    ledger(user, midnight + timedelta(minutes=5), today, "x", tokens=30, ttft_ms=200)
    ledger(user, midnight + timedelta(minutes=50), today, "x", tokens=10, ttft_ms=400)
    ledger(user, midnight + timedelta(hours=1), today, "x", status=Usage.Status.UPSTREAM_ERROR,
           reason="upstream_error", ttft_ms=1000)
    ledger(user, midnight + timedelta(hours=1, minutes=1), today, "x", status=Usage.Status.STREAMING, tokens=99)
    ledger(user, midnight - timedelta(minutes=1), today, "x", tokens=1000)  # yesterday, in UTC
    context = admin_client.get(reverse("admin:quotas_usage_dashboard"), {"range": "today"}).context
    tokens = context["charts"]["tokens"]["chart"]
    assert len(tokens.columns) == 24 and tokens.labels[-1].text == "23:00"
    assert "40 tokens" in tokens.columns[0].title and "1 requests" in tokens.columns[1].title  # not the running one
    assert context["summary"]["tokens"] == 40 and context["summary"]["failed"] == 1
    rates = context["charts"]["rates"]["chart"]
    assert rates.lines[0].d.startswith("M5 100 L15 0")  # hour 0: none of 2 failed; hour 1: 1 of 1
    assert context["first_token"] == {"p50": "0.40 s", "p95": "1.0 s"}


def test_first_token_percentiles_are_nearest_ranks_per_bucket_at_the_precision_shown(django_user_model):
    user = django_user_model.objects.create(username="timed")
    day = date(2026, 3, 10)
    at = datetime(2026, 3, 10, 12, tzinfo=UTC)
    for ms in range(1, 101):  # 1..100 ms, shuffled in time
        ledger(user, at + timedelta(seconds=(ms * 37) % 100), day, "x", ttft_ms=ms)
    ledger(user, at + timedelta(days=1), day, "x", ttft_ms=7)  # a day with one row
    ledger(user, at, day, "x")  # no first token: not counted
    period = Period(date(2026, 3, 10), date(2026, 3, 11), "")
    by_day, overall = first_token_percentiles(period)
    assert by_day == {date(2026, 3, 10): (50, 95), date(2026, 3, 11): (7, 7)}
    assert overall == (50, 95)  # 101 rows (1..7, 7, 8..100): ranks 51 and 96
    # Rounded as shown (display.seconds): 10 ms under a second, 100 ms under ten, 1 s above.
    for n, ms in enumerate((428, 1_449, 1_450, 12_600)):
        ledger(user, at + timedelta(days=2, seconds=n), day, "x", ttft_ms=ms)
    _, overall = first_token_percentiles(Period(date(2026, 3, 12), date(2026, 3, 12), ""))
    assert overall == (1400, 13000)  # ranks 2 and 4 of 430, 1400, 1500, 13000


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
