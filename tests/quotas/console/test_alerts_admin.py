"""quotas/console/alerts.py: the alert rules, events and outbox in the admin (the test client, as an operator)."""

import pytest
from django.urls import reverse

from quotas.models import AlertEvent, AlertRule, AuditEntry, Outbox
from tests.quotas.console.test_admin import form_data

pytestmark = pytest.mark.django_db


def test_a_rule_is_audited_and_the_outbox_shows_status_without_a_webhooks_secret_path(admin_client):
    add = reverse("admin:quotas_alertrule_add")
    response = admin_client.post(add, form_data(admin_client.get(add), **{
        "name": "team budget", "kind": "everyone", "thresholds": "[80, 100]", "windows": '["tokens_month"]',
        "emails": '["ops@example.com"]', "webhook_url": "", "webhook_format": "json", "enabled": "on"}))
    assert response.status_code == 302, response.context["adminform"].form.errors
    rule = AlertRule.objects.get()
    assert rule.thresholds == [80, 100]
    entry = AuditEntry.objects.get(target_type="quotas.alertrule")
    assert (entry.action, entry.new["emails"]) == (AuditEntry.Action.CREATED, ["ops@example.com"])
    # Refused: a threshold that is not a percentage.
    change = reverse("admin:quotas_alertrule_change", args=[rule.pk])
    response = admin_client.post(change, form_data(admin_client.get(change), thresholds="[150]"))
    assert response.status_code == 200 and "percentages from 1 to 100" in response.content.decode()

    event = AlertEvent.objects.create(rule=rule, scope="user:1", window_key="tokens_month:2026-12", threshold=80)
    failed = Outbox.objects.create(event=event, channel="webhook", status="failed", attempts=10,
                                   target="https://hooks.slack.com/services/T000/B000/secret-part",
                                   payload={"text": "80 %"}, last_error="HTTP 500 from hooks.slack.com")
    page = admin_client.get(reverse("admin:quotas_outbox_changelist")).content.decode()
    assert "hooks.slack.com" in page and "secret-part" not in page and "failed" in page
    assert admin_client.get(reverse("admin:quotas_alertevent_changelist")).status_code == 200
    admin_client.post(reverse("admin:quotas_outbox_changelist"),
                      {"action": "send_again", "_selected_action": [failed.pk]})
    failed.refresh_from_db()
    assert (failed.status, failed.attempts) == ("pending", 0)
