"""quotas/console/alerts.py: the alert rules, events and outbox in the admin (the test client, as an operator)."""

from decimal import Decimal

import pytest
from django.urls import reverse

from quotas.models import AlertEvent, AlertRule, AuditEntry, Outbox, Team
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


def test_a_team_rule_on_the_monthly_budget_is_added_with_its_team(admin_client):
    team = Team.objects.create(name="ml", budget_per_month=Decimal("10"))
    add = reverse("admin:quotas_alertrule_add")
    page = admin_client.get(add)
    assert 'value="team"' in page.content.decode() and f'<option value="{team.pk}">ml</option>' in page.content.decode()
    fields = {"name": "ml budget", "kind": "team", "thresholds": "[80]", "windows": '["money_month"]',
              "emails": '["ml-leads@example.com"]', "webhook_url": "", "webhook_format": "json", "enabled": "on"}
    # Refused, and told why: a team rule names its team; a window that does not exist.
    response = admin_client.post(add, form_data(page, **fields, team=""))
    assert response.status_code == 200 and "A rule of a team names the team." in response.content.decode()
    response = admin_client.post(add, form_data(page, **{**fields, "windows": '["money_week"]'}, team=str(team.pk)))
    assert response.status_code == 200 and "money_month" in str(response.context["adminform"].form.errors["windows"])

    response = admin_client.post(add, form_data(page, **fields, team=str(team.pk)), follow=True)
    rule = AlertRule.objects.get()
    assert (rule.kind, rule.team_id, rule.thresholds, rule.windows) == ("team", team.pk, [80], ["money_month"])
    assert "no limit on" not in response.content.decode()  # the team has a monthly budget
    entry = AuditEntry.objects.get(target_type="quotas.alertrule")
    assert (entry.action, entry.new["team"], entry.new["windows"]) == (AuditEntry.Action.CREATED, "ml", ["money_month"])
    assert "team ml" in admin_client.get(reverse("admin:quotas_alertrule_changelist")).content.decode()
    # A window the team's pool does not limit: saved, with a warning (the pool may get its limit later).
    change = reverse("admin:quotas_alertrule_change", args=[rule.pk])
    response = admin_client.post(change, form_data(admin_client.get(change), windows='["money_day", "money_month"]'),
                                 follow=True)
    assert "The team &#x27;ml&#x27; has no limit on money_day" in response.content.decode()
