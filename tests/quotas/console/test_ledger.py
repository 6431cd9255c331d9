"""quotas/console/ledger.py: the ledger's and the audit trail's lists, as an operator reads them (issue 19, item 8)."""

from django.urls import reverse
from django.utils import timezone

from quotas.models import AuditEntry, Plan, Usage, UserQuota

Action = AuditEntry.Action


def test_ledger_rows_show_a_short_id_a_badge_total_tokens_and_seconds(admin_client, django_user_model):
    user = django_user_model.objects.create(username="reader")
    now = timezone.now()
    Usage.objects.create(request_id="req_0123456789abcdef0123456789abcdef", user=user, model="sim-small",
                         status=Usage.Status.UPSTREAM_ERROR, reason="upstream_error", started_at=now,
                         prompt_tokens=1234, completion_tokens=12_000, duration_ms=1534, time_to_first_token_ms=420,
                         day=now.date(), month=now.strftime("%Y-%m"))
    response = admin_client.get(reverse("admin:quotas_usage_changelist"))
    page = response.content.decode()
    assert 'title="req_0123456789abcdef0123456789abcdef">req_01234567…</span>' in page
    assert 'sluice-badge--bad" title="upstream_error">upstream error</span>' in page
    assert '<div class="sluice-reason">upstream_error</div>' in page
    assert 'reader<div class="sluice-sub">sim-small</div>' in page
    assert 'title="1,234 prompt + 12,000 completion">13,234</span>' in page
    assert '1.5 s<div class="sluice-sub" title="time to the first token">first 0.42 s</div>' in page
    assert response.context["cl"].list_display == ["request", "caller", "outcome", "tokens", "started", "duration"]
    # The full id still finds the row.
    found = admin_client.get(reverse("admin:quotas_usage_changelist"), {"q": "req_0123456789abcdef0123456789abcdef"})
    assert len(found.context["cl"].result_list) == 1


def test_audit_entries_link_their_target_while_it_exists(admin_client, make_user):
    caller = make_user()
    plan = Plan.objects.get(pk=caller.plan.pk)
    quota = UserQuota.objects.get(user=caller.user)
    AuditEntry.entry(None, Action.LIMITS_CHANGED, plan, {"tokens_per_day": 10_000}, {"tokens_per_day": 20_000}).save()
    AuditEntry.entry(None, Action.LIMITS_CHANGED, quota, {"requests_per_minute": None},
                     {"requests_per_minute": 7}).save()
    AuditEntry.entry(None, Action.REMOVED, quota, old={"plan": plan.name}).save()
    page = admin_client.get(reverse("admin:quotas_auditentry_changelist")).content.decode()
    plan_url = reverse("admin:quotas_plan_change", args=[plan.pk])
    quota_url = reverse("admin:quotas_userquota_change", args=[quota.pk])
    assert f'<a href="{plan_url}">{plan.name}</a> <span class="sluice-sub">plan</span>' in page
    assert "<b>tokens_per_day:</b> 10,000 → 20,000" in page
    assert "<b>requests_per_minute:</b> plan&#x27;s value → 7" in page
    assert page.count(f'<a href="{quota_url}">') == 1  # the removal's entry is not linked
