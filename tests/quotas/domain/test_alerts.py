"""quotas/domain/alerts.py: thresholds fire once per scope × window × threshold — across connections, streams and
gateway processes — and again in the next window; operators' alerts, deduplicated per 10 minutes."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import httpx2
import pytest
from django.db import connections
from django.utils import timezone

from quotas.domain import alerts, outbox
from quotas.domain.exceptions import CounterStoreDown
from quotas.domain.leases import TokenLease
from quotas.domain.money import NANOS, Price, cost_nanos
from quotas.domain.policy import Limits, Pool, calendar_windows
from quotas.models import AlertEvent, AlertRule, Outbox, Team, TeamMembership
from tests.quotas.domain.test_budgets import run_streams
from tests.quotas.domain.test_teams import make_team, priced_model
from tests.support.gateways import eventually, gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["priced_model"]  # a fixture, used by name

BIG = 10**9


@pytest.fixture(autouse=True)
def fresh_alerts():
    """Each test starts as a new process would: no rules read, nothing remembered as fired."""
    alerts.reset()
    yield
    alerts.reset()


def limits(day=1000, month=BIG):
    return Limits(tokens_per_day=day, tokens_per_month=month, requests_per_minute=60, concurrent_streams=10,
                  max_tokens_per_request=4096, allowed_models=())


def user_rule(user, **fields):
    fields.setdefault("emails", ["ops@example.com"])
    return AlertRule.objects.create(name=fields.pop("name", "watch"), kind="user", user=user, **fields)


def check(user_id, plan, windows, remaining, returned=0):
    return asyncio.run(alerts.check(user_id, plan, windows, remaining, returned))


def test_fifty_connections_crossing_a_threshold_at_once_write_one_event_and_one_delivery(make_user):
    """The guarantee across processes: 50 threads, each on its own database connection (as 50 processes would be),
    with nothing remembered in memory, insert the same crossing at once; the unique constraint lets one win."""
    caller = make_user(tokens_per_day=1000)
    user_rule(caller.user, thresholds=[50, 80], windows=["tokens_day"], emails=[],
              webhook_url="http://127.0.0.1:9/hook")
    (rule,) = alerts.load_rules().for_user(caller.user.pk)
    day = calendar_windows(limits(), timezone.now())[0]
    scope = f"user:{caller.user.pk}"

    def race(used):
        measure = alerts.Measure("tokens_day", day.key, used, 1000, day.end)
        crossings = [alerts.Crossing(rule, measure, t) for t in rule.thresholds if used * 100 >= t * 1000]
        barrier = threading.Barrier(50)

        def one():
            try:
                barrier.wait(timeout=10)
                return alerts.fire(scope, caller.user.pk, crossings).fired
            finally:
                connections.close_all()

        with ThreadPoolExecutor(50) as pool:
            return sorted(future.result() for future in [pool.submit(one) for _ in range(50)])

    assert race(600) == [0] * 49 + [1]  # 60 %: the 50 % threshold
    assert race(850) == [0] * 49 + [1]  # 85 %: 50 % again (nothing) and 80 % (once)
    events = list(AlertEvent.objects.order_by("threshold"))
    assert [(e.threshold, e.scope, e.window_key) for e in events] == [
        (50, scope, f"tokens_day:{day.key}"), (80, scope, f"tokens_day:{day.key}")]
    assert [(d.event_id, d.channel) for d in Outbox.objects.order_by("id")] == [
        (events[0].pk, "webhook"), (events[1].pk, "webhook")]


def test_fifty_streams_settling_past_a_threshold_at_once_fire_it_once(make_user):
    """Through the real leases (TokenLease.settle calls alerts.settled): one user's 50 streams settle at once, each
    past 80 % of the day."""
    caller = make_user(tokens_per_day=1000)
    rule = user_rule(caller.user, thresholds=[80])
    user_id, plan = caller.user.pk, limits(day=1000)

    async def scenario():
        big = TokenLease(user_id, plan, "req_big", timezone.now())
        await big.admit(prompt_tokens=799, requested_max=1, stream=False)  # 800 of 1,000
        streams = [TokenLease(user_id, plan, f"req_{i}", timezone.now()) for i in range(50)]
        for lease in streams:
            await lease.admit(prompt_tokens=2, requested_max=1, stream=False)  # 3 each: 950 in all
        await asyncio.gather(*(lease.settle(lease.held) for lease in streams))
        await big.settle(big.held)

    asyncio.run(scenario())
    (event,) = AlertEvent.objects.filter(rule=rule)
    today = calendar_windows(plan, timezone.now())[0].key
    assert (event.threshold, event.window_key, event.scope) == (80, f"tokens_day:{today}", f"user:{user_id}")
    assert 800 <= event.used <= 950 and event.limit == 1000
    (delivery,) = Outbox.objects.all()
    assert (delivery.event_id, delivery.channel, delivery.target) == (event.pk, "email", "ops@example.com")


def test_the_lease_given_back_at_settlement_does_not_count(make_user):
    """A stream that leased 900 of 1,000 but used 100: after settlement the window counts 100, not 900."""
    caller = make_user(tokens_per_day=1000)
    user_rule(caller.user, thresholds=[50])
    plan = limits(day=1000)

    async def scenario():
        lease = TokenLease(caller.user.pk, plan, "req_short", timezone.now())
        await lease.admit(prompt_tokens=10, requested_max=890, stream=False)
        await lease.settle(100)

    asyncio.run(scenario())
    assert not AlertEvent.objects.exists()


def test_a_threshold_fires_again_in_the_next_window(make_user):
    caller = make_user()
    user_rule(caller.user, thresholds=[50], windows=["tokens_day"])
    plan, now = limits(day=1000), timezone.now()
    today, tomorrow = calendar_windows(plan, now), calendar_windows(plan, now + timedelta(days=1))
    uid = caller.user.pk

    assert check(uid, plan, today, (400, BIG)) == 1  # 60 % of today
    assert check(uid, plan, today, (100, BIG)) == 0  # 90 %: fired already (remembered here)
    alerts.reset()  # another process, or this one restarted: the database remembers
    assert check(uid, plan, today, (100, BIG)) == 0
    assert check(uid, plan, tomorrow, (400, BIG)) == 1  # a new window: armed again
    assert [e.window_key for e in AlertEvent.objects.order_by("id")] == [
        f"tokens_day:{today[0].key}", f"tokens_day:{tomorrow[0].key}"]
    assert Outbox.objects.count() == 2


def test_thresholds_crossed_together_are_told_once_at_the_highest(make_user):
    caller = make_user()
    user_rule(caller.user, thresholds=[50, 80, 100], windows=["tokens_day"])
    plan = limits(day=1000)
    day = calendar_windows(plan, timezone.now())

    assert check(caller.user.pk, plan, day, (50, BIG)) == 2  # 95 %: 50 and 80 crossed by one settlement
    assert check(caller.user.pk, plan, day, (0, BIG)) == 1  # 100 %
    assert sorted(AlertEvent.objects.values_list("threshold", flat=True)) == [50, 80, 100]
    told = [d.payload["subject"] for d in Outbox.objects.order_by("id")]
    assert len(told) == 2 and "80 %" in told[0] and "100 %" in told[1]
    assert "950 of 1,000 tokens" in Outbox.objects.order_by("id")[0].payload["body"]


def test_plan_and_everyone_rules_apply_to_their_users(make_user):
    on_plan, other = make_user(), make_user()
    AlertRule.objects.create(name="plan", kind="plan", plan=on_plan.plan, thresholds=[80], emails=["a@example.com"])
    AlertRule.objects.create(name="all", kind="everyone", thresholds=[80], emails=["b@example.com"])
    user_rule(other.user, name="other's own", thresholds=[10])
    AlertRule.objects.create(name="off", kind="everyone", thresholds=[1], emails=["c@example.com"], enabled=False)
    plan = limits(day=1000)
    day = calendar_windows(plan, timezone.now())

    assert check(on_plan.user.pk, plan, day, (100, BIG)) == 2  # its plan's rule and everyone's
    assert check(other.user.pk, plan, day, (100, BIG)) == 2  # everyone's and its own (not the other plan's)
    assert check(other.user.pk, plan, day, (0, BIG)) == 0
    fired = set(AlertEvent.objects.values_list("rule__name", "scope"))
    assert fired == {("plan", f"user:{on_plan.user.pk}"), ("all", f"user:{on_plan.user.pk}"),
                     ("all", f"user:{other.user.pk}"), ("other's own", f"user:{other.user.pk}")}


def test_a_suspended_user_or_a_lease_that_never_leased_checks_nothing(make_user):
    caller = make_user()
    user_rule(caller.user, thresholds=[1])
    day = calendar_windows(limits(), timezone.now())
    suspended = Limits(**{**limits().__dict__, "suspended": True})
    assert check(caller.user.pk, suspended, day, (0, 0)) == 0
    assert check(caller.user.pk, limits(), day, ()) == 0
    assert not AlertEvent.objects.exists()


def test_an_operator_alert_fires_once_per_kind_per_ten_minutes(transactional_db):
    AlertRule.objects.create(name="ops", kind="operators", emails=["ops@example.com"])
    t0 = timezone.now().replace(minute=21, second=0, microsecond=0)

    async def scenario():
        return [
            await alerts.operator_alert("counter_store_down", "down", now=t0),
            await alerts.operator_alert("counter_store_down", "down", now=t0 + timedelta(minutes=1)),  # remembered
            alerts.reset(),
            await alerts.operator_alert("counter_store_down", "down", now=t0 + timedelta(minutes=2)),  # in the table
            await alerts.operator_alert("breaker_open", "dep-a opened", subject="dep-a", now=t0),  # another kind
            await alerts.operator_alert("counter_store_down", "down", now=t0 + timedelta(minutes=9)),  # 10:30 bucket
        ]

    assert asyncio.run(scenario()) == [1, 0, None, 0, 1, 1]
    assert sorted(AlertEvent.objects.values_list("scope", "window_key")) == [
        ("operator:breaker_open:dep-a", f"breaker_open:{t0:%Y-%m-%dT%H}:20Z"),
        ("operator:counter_store_down", f"counter_store_down:{t0:%Y-%m-%dT%H}:20Z"),
        ("operator:counter_store_down", f"counter_store_down:{t0:%Y-%m-%dT%H}:30Z"),
    ]
    assert Outbox.objects.count() == 3


def test_requests_that_find_the_counter_store_down_alert_the_operators_once(make_user, settings):
    from quotas.store import reset_stores

    caller = make_user()
    AlertRule.objects.create(name="ops", kind="operators", emails=["ops@example.com"])
    # A real Redis client, pointed where nothing listens: every operation raises StoreUnavailable.
    settings.SLUICE_COUNTER_STORE = "quotas.store.redis.RedisStore"
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    reset_stores()

    async def scenario():
        for i in range(20):
            with pytest.raises(CounterStoreDown):
                await TokenLease(caller.user.pk, limits(), f"req_down_{i}", timezone.now()).admit(10, 10, True)
        await asyncio.gather(*list(alerts._state.tasks))  # the alert is written in the background

    try:
        asyncio.run(scenario())
    finally:
        reset_stores()
    (event,) = AlertEvent.objects.all()
    assert event.scope == "operator:counter_store_down" and "token quotas fail closed" in event.message
    (delivery,) = Outbox.objects.all()
    assert delivery.payload["subject"] == "[Sluice] counter store down"


def test_an_operator_alert_without_an_operators_rule_is_only_logged(transactional_db, caplog):
    assert asyncio.run(alerts.operator_alert("counter_store_down", "the store is down")) == 0
    assert "no operators' alert rule" in caplog.text and "the store is down" in caplog.text
    assert not AlertEvent.objects.exists()


def stream(http, key):
    response = http.post("/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "sim-small", "stream": True, "max_tokens": 40,
                               "messages": [{"role": "user", "content": "go"}]})
    return response.status_code


def test_a_user_streaming_past_80_percent_through_a_gateway_gets_one_alert(make_user, mailoutbox):
    caller = make_user(tokens_per_day=400, requests_per_minute=1000)
    rule = user_rule(caller.user, name="80 % of the day", thresholds=[80], windows=["tokens_day"])
    statuses, alerted = [], []  # per request: its status, and the outbox's rows once it settled
    with gateway_server() as gateway, httpx2.Client(base_url=gateway.api_url, timeout=30) as http:
        while not statuses or statuses[-1] == 200:
            assert len(statuses) < 20
            statuses.append(stream(http, caller.key))
            eventually(lambda: gateway.unsettled() == 0)  # settled: the lease, and so the alert check
            alerted.append(Outbox.objects.count())
    assert statuses[-1] == 429  # streamed until the day was spent
    crossing = alerted.index(1)
    assert alerted == [0] * crossing + [1] * (len(alerted) - crossing)
    assert statuses[crossing + 1] == 200  # a stream settled past 80 % after the alert fired: no second one
    (event,) = AlertEvent.objects.all()
    assert (event.rule_id, event.threshold, event.limit) == (rule.pk, 80, 400) and 320 <= event.used <= 400
    (delivery,) = Outbox.objects.all()
    assert delivery.event_id == event.pk
    assert outbox.deliver_due() == {"sent": 1}
    (mail,) = mailoutbox
    assert mail.to == ["ops@example.com"] and "80 %" in mail.subject and caller.user.username in mail.subject


def test_two_gateway_processes_on_one_redis_alert_once(make_user, redis_url):
    """Streams of one user through two processes at once, several of them settling past the threshold in each."""
    caller = make_user(tokens_per_day=600, requests_per_minute=1000, concurrent_streams=20)
    user_rule(caller.user, thresholds=[50], windows=["tokens_day"])
    with (gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second,
          httpx2.Client(base_url=first.api_url, timeout=30) as one,
          httpx2.Client(base_url=second.api_url, timeout=30) as two,
          ThreadPoolExecutor(8) as pool):
        statuses = list(pool.map(lambda i: stream((one, two)[i % 2], caller.key), range(24)))
        eventually(lambda: first.unsettled() == 0 and second.unsettled() == 0)
    assert 429 in statuses and statuses.count(200) >= 6
    assert AlertEvent.objects.count() == 1
    assert Outbox.objects.count() == 1


# Money windows and team pools ---------------------------------------------------------------------------------------

# 10,000 per million tokens, input and output alike: a token costs 0.01 (10⁷ nanos), so 1,000 tokens spend 10.00.
CENT_A_TOKEN = Price(input=Decimal("10000"), output=Decimal("10000"))
CENT = NANOS // 100


def money_limits(budget_month=None, pools=()):
    """Token limits far away; a monthly budget (in nanos) if given; the key's pools (a team's)."""
    return Limits(tokens_per_day=BIG, tokens_per_month=BIG, requests_per_minute=60, concurrent_streams=100,
                  max_tokens_per_request=4096, allowed_models=(), budget_per_month=budget_month, pools=tuple(pools))


def team_pool(team):
    return Pool("team", team.pk, team.name, team.timezone, team.tokens_per_day, team.tokens_per_month,
                budget_per_month=None if team.budget_per_month is None else int(team.budget_per_month * NANOS))


async def spend(user_id, plan, cents, holder, now=None, held_cents=None):
    """One priced request that costs `cents` (prompt tokens at a cent each), settled: it leases `held_cents` (more
    than it costs: a completion budget it does not use, given back at settlement)."""
    lease = TokenLease(user_id, plan, holder, now or timezone.now(), CENT_A_TOKEN)
    extra = (held_cents or cents) - cents
    await lease.admit(prompt_tokens=cents, requested_max=extra or 1, stream=False)
    await lease.settle(cents, cost_nanos(CENT_A_TOKEN, cents, 0))
    return lease


def test_a_budget_crossing_50_and_80_percent_fires_each_once_in_the_currency(make_user, settings):
    settings.SLUICE_CURRENCY = "USD"
    caller = make_user()
    user_rule(caller.user, thresholds=[50, 80, 90], windows=["money_month"])
    uid, plan = caller.user.pk, money_limits(budget_month=10 * NANOS)

    async def scenario():
        await spend(uid, plan, 600, "req_1")  # 6.00 of 10.00: 50 %
        await spend(uid, plan, 220, "req_2")  # 8.20: 80 %
        # 8.30, though it held 9.20 until it settled: what it gave back does not count (90 % does not fire).
        await spend(uid, plan, 10, "req_3", held_cents=100)
        alerts.reset()  # another process: the database remembers
        await spend(uid, plan, 10, "req_4")  # 8.40

    asyncio.run(scenario())
    events = list(AlertEvent.objects.order_by("threshold"))
    month = calendar_windows(plan, timezone.now())[1].key
    assert [(e.threshold, e.scope, e.window_key, e.used, e.limit) for e in events] == [
        (50, f"user:{uid}", f"money_month:{month}", 600 * CENT, 10 * NANOS),
        (80, f"user:{uid}", f"money_month:{month}", 820 * CENT, 10 * NANOS)]
    assert "6.00 of 10.00 USD" in events[0].message and "8.20 of 10.00 USD" in events[1].message
    assert "of the monthly budget" in events[1].message
    first, second = (d.payload for d in Outbox.objects.order_by("id"))
    assert first["subject"] == f"[Sluice] {caller.user.username}: 50 % of the monthly budget"
    assert "8.20 of 10.00 USD" in second["body"]


def test_a_team_rule_fires_once_when_members_settle_past_80_percent_at_once_on_two_event_loops(make_user):
    """50 members' streams settle at once, 25 on each of two event loops (threads), most of them past 80 % of the team's
    monthly budget: one event, one delivery per channel. Everyone's rule watches the members' own windows, not the
    pool's: it fires nothing."""
    team = Team.objects.create(name="ml", budget_per_month=Decimal("10"))
    members = [make_user() for _ in range(3)]
    for member in members:
        TeamMembership.objects.create(team=team, user=member.user)
    rule = AlertRule.objects.create(name="ml budget", kind="team", team=team, thresholds=[80], windows=["money_month"],
                                    emails=["ml-leads@example.com"], webhook_url="http://127.0.0.1:9/hook")
    AlertRule.objects.create(name="everyone's", kind="everyone", thresholds=[1], emails=["ops@example.com"])
    plan = money_limits(pools=[team_pool(team)])
    ids = [m.user.pk for m in members]

    async def admit_all():
        big = TokenLease(ids[0], plan, "req_big", timezone.now(), CENT_A_TOKEN)
        await big.admit(prompt_tokens=779, requested_max=1, stream=False)  # 7.80 of 10.00
        streams = [TokenLease(ids[i % 3], plan, f"req_{i}", timezone.now(), CENT_A_TOKEN) for i in range(50)]
        for lease in streams:
            await lease.admit(prompt_tokens=1, requested_max=1, stream=False)  # 0.02 each: 8.80 in all
        return big, streams

    big, streams = asyncio.run(admit_all())
    barrier = threading.Barrier(2)

    def settle(leases):
        async def run():
            barrier.wait(timeout=10)
            await asyncio.gather(*(lease.settle(lease.held, cost_nanos(CENT_A_TOKEN, lease.held, 0))
                                   for lease in leases))

        asyncio.run(run())

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(settle, [streams[0::2], streams[1::2]]))
    asyncio.run(big.settle(big.held, cost_nanos(CENT_A_TOKEN, big.held, 0)))

    (event,) = AlertEvent.objects.all()
    month = calendar_windows(plan, timezone.now())[1].key
    assert (event.rule_id, event.scope, event.window_key) == (rule.pk, f"team:{team.pk}", f"money_month:{month}")
    assert 800 * CENT <= event.used <= 880 * CENT and event.limit == 10 * NANOS
    assert event.message.startswith("team 'ml' has used") and "of 10.00 USD" in event.message
    email, webhook = Outbox.objects.order_by("channel")
    assert (email.target, email.payload["subject"]) == ("ml-leads@example.com",
                                                        "[Sluice] team 'ml': 80 % of the monthly budget")
    assert webhook.payload["team"] == {"id": team.pk, "name": "ml"} and webhook.payload["scope"] == f"team:{team.pk}"
    assert (webhook.payload["unit"], webhook.payload["currency"]) == ("money", "USD")
    assert webhook.payload["user"]["id"] in ids  # the member whose settlement crossed it


def test_a_users_rule_watches_the_users_windows_and_a_teams_rule_the_pools(make_user):
    """One member spends 60 % of their own budget but 6 % of the pool; another 56 % of the pool but 5 % of their own.
    Each rule fires for its own scope only."""
    team = Team.objects.create(name="research", budget_per_month=Decimal("100"))
    thrifty, spender = make_user(), make_user()
    thrifty_rule = user_rule(thrifty.user, name="thrifty", thresholds=[50], windows=["money_month"])
    user_rule(spender.user, name="spender", thresholds=[50], windows=["money_month"])
    team_rule = AlertRule.objects.create(name="research", kind="team", team=team, thresholds=[50],
                                         windows=["money_month"], emails=["leads@example.com"])
    pools = [team_pool(team)]

    async def scenario():
        await spend(thrifty.user.pk, money_limits(10 * NANOS, pools), 600, "req_thrifty")  # 6.00 of 10, of 100
        await spend(spender.user.pk, money_limits(1000 * NANOS, pools), 5000, "req_spender")  # 50 of 1,000; 56 of 100

    asyncio.run(scenario())
    assert sorted(AlertEvent.objects.values_list("rule_id", "scope", "used")) == sorted([
        (thrifty_rule.pk, f"user:{thrifty.user.pk}", 600 * CENT), (team_rule.pk, f"team:{team.pk}", 5600 * CENT)])


def test_a_team_rule_is_armed_again_in_the_next_month(make_user):
    """The pool's token and money windows alike: each fires once a month, with the month's window key."""
    team = Team.objects.create(name="infra", tokens_per_month=1000, budget_per_month=Decimal("10"))
    member = make_user()
    AlertRule.objects.create(name="infra", kind="team", team=team, thresholds=[80],
                             windows=["tokens_month", "money_month"], emails=["infra@example.com"])
    plan = money_limits(pools=[team_pool(team)])
    now = timezone.now()
    next_month = (now.replace(day=1) + timedelta(days=32)).replace(day=2)

    async def scenario():
        await spend(member.user.pk, plan, 850, "req_now", now)  # 850 tokens, 8.50: 85 % of both
        await spend(member.user.pk, plan, 10, "req_again", now)  # fired already this month
        await spend(member.user.pk, plan, 850, "req_next", next_month)

    asyncio.run(scenario())
    this, then = (calendar_windows(plan, when)[1].key for when in (now, next_month))
    assert sorted(AlertEvent.objects.values_list("window_key", "scope", "used")) == sorted([
        (f"money_month:{this}", f"team:{team.pk}", 850 * CENT), (f"tokens_month:{this}", f"team:{team.pk}", 850),
        (f"money_month:{then}", f"team:{team.pk}", 850 * CENT), (f"tokens_month:{then}", f"team:{team.pk}", 850)])
    assert Outbox.objects.count() == 4
    assert "850 of 1,000 tokens" in Outbox.objects.filter(event__window_key=f"tokens_month:{this}").get().payload[
        "body"]


def test_members_streaming_through_two_gateway_processes_alert_the_team_once(priced_model, redis_url, make_user):
    """The team's pool spent by three members' streams at once over two processes on one Redis: its 80 % fires once
    across them (the unique constraint), and the members' own rules nothing (their windows are far from it)."""
    budget = 8_000_000  # nanos; a stream of 40 tokens costs 168,000, so 50 of them spend it all
    team, people = make_team(make_user, budget_per_month=Decimal(budget) / NANOS)
    rule = AlertRule.objects.create(name="pool", kind="team", team=team, thresholds=[80], windows=["money_month"],
                                    emails=["leads@example.com"])
    for person in people:
        user_rule(person.user, name=f"own {person.user.pk}", thresholds=[50])
    with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
        for gateway in (first, second):
            gateway.control(tokens_per_second=400, default_tokens=40)
        run_streams([first, second], [p.team_key for p in people], 50, 40)
        eventually(lambda: first.unsettled() == 0 and second.unsettled() == 0)
    (event,) = AlertEvent.objects.all()
    assert (event.rule_id, event.threshold, event.scope, event.limit) == (rule.pk, 80, f"team:{team.pk}", budget)
    (delivery,) = Outbox.objects.all()
    assert delivery.event_id == event.pk and f"team '{team.name}'" in delivery.payload["subject"]
