"""Issue 18's "done when", end to end: an operator sets a team's monthly budget in money and an 80 % alert in the admin;
three members stream through two gateway processes (PostgreSQL, Redis) until the budget is spent; the alert arrives
once, signed; no one exceeds a limit; the ledger's costs add up to the budget used. docs/operations.md, "A team's
monthly budget, end to end", walks through the same steps.
"""

import json
from decimal import Decimal

import pytest
import redis
from django.db.models import Sum
from django.urls import reverse

from quotas.domain import alerts, outbox
from quotas.models import AlertEvent, ApiKey, Outbox, Team, Usage
from tests.quotas.console.test_admin import form_data
from tests.quotas.console.test_teams_admin import add_team
from tests.quotas.domain.test_budgets import OUTPUT_NANOS, priced_model, run_streams
from tests.support.gateways import eventually, gateway_server
from tests.support.webhooks import Receiver, verify

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["priced_model"]  # a fixture, used by name

SECRET = "whsec-story-0123456789abcdef"
BUDGET = Decimal("0.008")  # USD a month: about 2,000 completion tokens at 4 per million; 50 streams of 150 want 7,500
FAR = {"tokens_per_day": 10**7, "tokens_per_month": 10**8, "concurrent_streams": 50, "requests_per_minute": 1000}


@pytest.fixture(autouse=True)
def fresh_alerts():
    alerts.reset()
    yield
    alerts.reset()


def test_a_team_spends_its_monthly_budget_over_two_processes_and_is_alerted_once(
        priced_model, redis_url, make_user, admin_client, settings):
    settings.SLUICE_WEBHOOK_SECRET = SECRET
    people = [make_user(**FAR) for _ in range(3)]
    # The operator: the team and its members on the team's page, its monthly budget in money.
    team = add_team(admin_client, "research", [(p.user, "", "") for p in people], budget_per_month=str(BUDGET))
    assert team.budget_per_month == BUDGET
    keys = []
    for person in people:
        key, raw = ApiKey.issue(person.user, name="research")
        ApiKey.objects.filter(pk=key.pk).update(team=team)
        keys.append(raw)
    with Receiver() as receiver:
        # … and an 80 % alert rule on the team's monthly budget, to a signed webhook.
        add = reverse("admin:quotas_alertrule_add")
        response = admin_client.post(add, form_data(admin_client.get(add), **{
            "name": "research at 80 %", "kind": "team", "team": str(team.pk), "thresholds": "[80]",
            "windows": '["money_month"]', "emails": "[]", "webhook_url": receiver.url + "/hooks/sluice",
            "webhook_format": "json", "enabled": "on"}))
        assert response.status_code == 302, response.context["adminform"].form.errors

        with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
            for gateway in (first, second):
                gateway.control(tokens_per_second=200, default_tokens=200)
            results = run_streams([first, second], keys, 50, 150)
            eventually(lambda: first.unsettled() == 0 and second.unsettled() == 0, timeout=20)
        # The worker (`manage.py deliver_alerts` runs the same function) sends the one alert.
        assert outbox.deliver_due() == {"sent": 1}
        assert outbox.deliver_due() == {}
        ((path, headers, body),) = receiver.requests
    assert path == "/hooks/sluice" and verify(SECRET, headers["x-sluice-signature"], body)
    alert = json.loads(body)
    assert (alert["team"]["name"], alert["threshold"], alert["window"]["kind"], alert["currency"]) == (
        "research", 80, "money_month", "USD")
    assert AlertEvent.objects.count() == 1 and Outbox.objects.get().status == "sent"

    # Members were cut when the pool ran out, with the team named; nothing else went wrong.
    endings = {ending for _, ending, _ in results}
    assert "insufficient_quota" in endings and endings <= {"completed", "insufficient_quota"}, endings
    assert all("The team 'research' used up its monthly budget (USD)" in message
               for _, ending, message in results if ending == "insufficient_quota")
    # No one exceeded a limit, and the ledger's costs add up to the budget used.
    rows = Usage.objects.filter(team=team)
    assert rows.count() == 50 and not rows.filter(status="streaming").exists()
    totals = rows.aggregate(cost=Sum("cost_nanos"), charged=Sum("charged_nanos"), c=Sum("completion_tokens"))
    assert totals["c"] == sum(received for received, _, _ in results)
    budget = int(BUDGET * 10**9)
    assert totals["cost"] == totals["charged"] <= budget
    assert totals["charged"] > budget - 200 * OUTPUT_NANOS
    store = redis.Redis.from_url(redis_url)
    (window,) = store.keys(f"sluice:{{t{team.pk}}}:budget_month:*")
    assert int(store.hget(window, "used")) == totals["charged"]
    assert alert["used"] >= budget * 80 // 100 and alert["limit"] == budget
    assert Team.objects.get().usage.count() == 50
