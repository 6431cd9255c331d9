"""Team pools, members' caps and keys' spend limits (issue 18, items 2 and 3), enforced by real gateway processes on
PostgreSQL and Redis: every scope that applies is leased in the same counter-store operation, the stream is cut at
whichever runs out first and the error names it, nothing is ever exceeded, and a flushed store is rebuilt from the
ledger.

The priced model is tests/quotas/domain/test_budgets.py's: 1 per million input tokens and 4 per million output
tokens (1,000 and 4,000 nanos a token); the prompt ("count") is 8 tokens. The users' own token limits are far away.
"""

from decimal import Decimal

import httpx2
import pytest
import redis
from django.db.models import Sum

from quotas.models import ApiKey, Team, TeamMembership, Usage
from tests.quotas.domain.test_budgets import INPUT_NANOS, MESSAGES, OUTPUT_NANOS, priced_model, run_streams
from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["priced_model"]  # a fixture, used by name

FAR = {"tokens_per_day": 10**7, "tokens_per_month": 10**8, "concurrent_streams": 50, "requests_per_minute": 1000}


def nanos(amount: int) -> Decimal:
    return Decimal(amount) / 10**9


def team_key(user, team, **limits):
    key, raw = ApiKey.issue(user, name=f"{team.name} key")
    ApiKey.objects.filter(pk=key.pk).update(team=team, **limits)
    return raw


def make_team(make_user, members=3, cap=None, **pool):
    """A team with `members` users, each with a key that spends from it (and `cap`: each member's monthly cap)."""
    team = Team.objects.create(name=f"team-{Team.objects.count() + 1}", **pool)
    people = []
    for _ in range(members):
        person = make_user(**FAR)
        TeamMembership.objects.create(team=team, user=person.user, budget_per_month=cap)
        person.team_key = team_key(person.user, team)
        people.append(person)
    return team, people


def settled_team_rows(team, count):
    return eventually(lambda: (q := Usage.objects.filter(team=team)).exclude(status="streaming").count() == count
                      and q, timeout=20)


def ask(gateway, key, max_tokens):
    response = httpx2.post(gateway.api_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           timeout=30, json={"model": "sim-small", "messages": MESSAGES, "max_tokens": max_tokens})
    return response, (settled_row(response.headers["x-request-id"]) if response.status_code == 200 else None)


def test_a_team_pool_shared_by_three_members_over_two_processes_is_never_exceeded(priced_model, redis_url,
                                                                                  make_user):
    budget = 8_000_000  # about 2,000 completion tokens; 50 streams of 150 would need 7,500
    team, people = make_team(make_user, budget_per_month=nanos(budget))
    with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
        for gateway in (first, second):
            gateway.control(tokens_per_second=200, default_tokens=200)
        results = run_streams([first, second], [p.team_key for p in people], 50, 150)
        # Settled everywhere: the ledger row first, then the counter store (the Redis window is read below).
        eventually(lambda: first.unsettled() == 0 and second.unsettled() == 0, timeout=20)
    endings = {ending for _, ending, _ in results}
    assert "insufficient_quota" in endings and endings <= {"completed", "insufficient_quota"}, endings
    messages = {message for _, ending, message in results if ending == "insufficient_quota"}
    assert all(f"The team '{team.name}' used up its monthly budget (USD)" in m for m in messages), messages
    rows = settled_team_rows(team, 50)
    totals = rows.aggregate(charged=Sum("charged_nanos"), cost=Sum("cost_nanos"), c=Sum("completion_tokens"))
    assert totals["c"] == sum(received for received, _, _ in results)
    assert totals["charged"] <= budget  # zero overshoot
    assert totals["charged"] > budget - 200 * OUTPUT_NANOS  # and the pool was used
    assert set(rows.values_list("user_id", flat=True)) == {p.user.pk for p in people}
    # The ledger's costs add up to what the pool counts.
    window = next(k for k in redis.Redis.from_url(redis_url).keys(f"sluice:{{t{team.pk}}}:budget_month:*"))
    assert int(redis.Redis.from_url(redis_url).hget(window, "used")) == totals["charged"]


def test_a_members_cap_cuts_that_member_and_no_one_else(priced_model, redis_url, make_user):
    cap = 8 * INPUT_NANOS + 50 * OUTPUT_NANOS
    team, (capped, free) = make_team(make_user, members=2, budget_per_month=nanos(10**9))
    TeamMembership.objects.filter(user=capped.user).update(budget_per_month=nanos(cap))
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        response, row = ask(gateway, capped.team_key, 200)
        assert response.status_code == 200 and row.completion_tokens == 50 and row.charged_nanos == cap
        refused, _ = ask(gateway, capped.team_key, 10)
        assert refused.status_code == 429
        assert f"your monthly cap (USD) in the team '{team.name}'" in refused.json()["error"]["message"]
        response, row = ask(gateway, free.team_key, 200)
        assert response.status_code == 200 and row.completion_tokens == 200 and row.team_id == team.pk


def test_a_keys_spend_limit_below_its_users_budget_binds_that_key_only(priced_model, redis_url, make_user):
    limit = 8 * INPUT_NANOS + 30 * OUTPUT_NANOS
    caller = make_user(**FAR, budget_per_day=nanos(10**9))
    key, raw = ApiKey.issue(caller.user, name="limited")
    ApiKey.objects.filter(pk=key.pk).update(budget_per_day=nanos(limit))
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        response, row = ask(gateway, raw, 200)
        assert response.status_code == 200 and row.completion_tokens == 30 and row.charged_nanos == limit
        refused, _ = ask(gateway, raw, 10)
        assert refused.status_code == 429
        assert f"This API key ({key.prefix}…) reached its daily spend limit" in refused.json()["error"]["message"]
        # The user's other key still spends from the user's budget.
        response, row = ask(gateway, caller.key, 100)
        assert response.status_code == 200 and row.completion_tokens == 100


def test_team_spend_counts_against_the_users_own_budget_too(priced_model, redis_url, make_user):
    """No budget is bypassed through a second scope: a team key still spends from its user's budget."""
    own = 8 * INPUT_NANOS + 40 * OUTPUT_NANOS
    team, (person,) = make_team(make_user, members=1, budget_per_month=nanos(10**9))
    from quotas.models import UserQuota

    UserQuota.objects.filter(user=person.user).update(budget_per_day=nanos(own))
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        response, row = ask(gateway, person.team_key, 200)
        assert response.status_code == 200 and row.completion_tokens == 40 and row.team_id == team.pk
        refused, _ = ask(gateway, person.key, 10)  # the personal key: the same user's budget is spent
        assert refused.status_code == 429 and "You exceeded your daily budget" in refused.json()["error"]["message"]


def test_a_flushed_redis_rebuilds_the_team_pool_and_the_caps_from_the_ledger(priced_model, redis_url, make_user):
    budget = 1_000_000
    team, (one, two) = make_team(make_user, members=2, budget_per_month=nanos(budget),
                                 cap=nanos(budget))  # caps as large as the pool: their windows exist
    each = 8 * INPUT_NANOS + 40 * OUTPUT_NANOS
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        for person in (one, two, one):
            response, row = ask(gateway, person.team_key, 40)
            assert response.status_code == 200 and row.charged_nanos == each
        redis.Redis.from_url(redis_url).flushdb()
        response, row = ask(gateway, two.team_key, 500)
        assert response.status_code == 200
        left = (budget - 3 * each - 8 * INPUT_NANOS) // OUTPUT_NANOS  # rebuilt, not reset
        assert 0 < row.completion_tokens <= left
        refused, _ = ask(gateway, one.team_key, 40)
        assert refused.status_code == 429 and f"team '{team.name}'" in refused.json()["error"]["message"]
    total = Usage.objects.filter(team=team).aggregate(charged=Sum("charged_nanos"))["charged"]
    assert budget - OUTPUT_NANOS < total <= budget


def test_a_key_whose_user_left_its_team_is_refused(priced_model, redis_url, make_user):
    team, (person,) = make_team(make_user, members=1, budget_per_month=nanos(10**9))
    TeamMembership.objects.filter(user=person.user).delete()
    with gateway_server(REDIS_URL=redis_url) as gateway:
        refused, _ = ask(gateway, person.team_key, 10)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "This API key spends from a team its user no longer belongs to."
    assert not Usage.objects.filter(team=team).exists()


def test_a_change_to_a_team_its_membership_or_its_key_binds_the_very_next_request(priced_model, redis_url,
                                                                                  make_user):
    """A gateway reuses a request's windows for the next one with the same limits (quotas/domain/windows.py): a
    budget lowered, a cap set, a membership removed in the database must bind the next request, not a later one."""
    team, (person,) = make_team(make_user, members=1, budget_per_month=nanos(10**9))
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        for _ in range(2):  # the second reuses the first's windows
            response, row = ask(gateway, person.team_key, 100)
            assert response.status_code == 200 and row.completion_tokens == 100
        spent = Usage.objects.filter(team=team).aggregate(charged=Sum("charged_nanos"))["charged"]
        Team.objects.filter(pk=team.pk).update(budget_per_month=nanos(spent + 8 * INPUT_NANOS + 30 * OUTPUT_NANOS))
        response, row = ask(gateway, person.team_key, 100)
        assert response.status_code == 200 and row.completion_tokens == 30  # cut at the team's new budget
        refused, _ = ask(gateway, person.team_key, 10)
        assert f"The team '{team.name}' used up its monthly budget (USD)" in refused.json()["error"]["message"]
        Team.objects.filter(pk=team.pk).update(budget_per_month=nanos(10**9))
        spent = Usage.objects.filter(team=team).aggregate(charged=Sum("charged_nanos"))["charged"]
        cap = spent + 8 * INPUT_NANOS + 20 * OUTPUT_NANOS  # the member's spend so far counts against a new cap
        TeamMembership.objects.filter(user=person.user).update(budget_per_month=nanos(cap))
        response, row = ask(gateway, person.team_key, 100)
        assert response.status_code == 200 and row.completion_tokens == 20  # the member's new cap
        TeamMembership.objects.filter(user=person.user).update(budget_per_month=None)
        ApiKey.objects.filter(team=team).update(budget_per_day=nanos(1))
        refused, _ = ask(gateway, person.team_key, 10)
        assert refused.status_code == 429 and "reached its daily spend limit" in refused.json()["error"]["message"]
        TeamMembership.objects.filter(user=person.user).delete()
        refused, _ = ask(gateway, person.team_key, 10)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "This API key spends from a team its user no longer belongs to."


def test_quota_and_headers_show_what_is_left_in_money_in_every_scope(priced_model, redis_url, make_user):
    team, (person,) = make_team(make_user, members=1, budget_per_month=nanos(2 * 10**9), cap=nanos(10**9))
    from quotas.models import UserQuota

    UserQuota.objects.filter(user=person.user).update(budget_per_day=nanos(5 * 10**9))
    ApiKey.objects.filter(team=team).update(budget_per_day=nanos(10**8))  # 0.1: the tightest
    headers = {"Authorization": f"Bearer {person.team_key}"}
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        response, row = ask(gateway, person.team_key, 10)
        assert response.status_code == 200
        spent_at_admission = 8 * INPUT_NANOS + 10 * OUTPUT_NANOS  # the prompt and the whole (non-streamed) budget
        assert response.headers["x-sluice-budget-scope"] == "key:day"
        assert response.headers["x-sluice-budget-limit"] == "0.1"
        assert response.headers["x-sluice-budget-remaining"] == str((Decimal(10**8 - spent_at_admission) / 10**9))
        assert response.headers["x-sluice-budget-currency"] == "USD"
        quota = eventually(lambda: (q := httpx2.get(gateway.api_url + "/quota", headers=headers).json())
                           and q["team"]["budget"]["month"]["used"] != "0" and q)
    spent = Decimal(row.charged_nanos) / 10**9
    assert quota["currency"] == "USD"
    assert Decimal(quota["budget"]["day"]["used"]) == spent and quota["budget"]["day"]["limit"] == "5"
    assert quota["key"]["budget"]["day"]["remaining"] == str(Decimal("0.1") - spent)
    assert quota["team"] == {"name": team.name, "budget": {"month": quota["team"]["budget"]["month"]}}
    assert Decimal(quota["team"]["budget"]["month"]["remaining"]) == 2 - spent
    assert quota["member"]["budget"]["month"]["limit"] == "1"
    # A caller without any budget: no money in the answer, no budget headers.
    plain = make_user(**FAR)
    with gateway_server(REDIS_URL=redis_url) as gateway:
        response, _ = ask(gateway, plain.key, 5)
        answer = httpx2.get(gateway.api_url + "/quota", headers={"Authorization": f"Bearer {plain.key}"}).json()
    assert "x-sluice-budget-remaining" not in response.headers
    assert (answer["budget"], answer["key"], answer["team"], answer["member"]) == (None, None, None, None)
