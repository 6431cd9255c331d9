"""quotas/domain/alerts.py: thresholds fire once per scope × window × threshold — across connections, streams and
gateway processes — and again in the next window; operators' alerts, deduplicated per 10 minutes."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx2
import pytest
from django.db import connections
from django.utils import timezone

from quotas.domain import alerts, outbox
from quotas.domain.exceptions import CounterStoreDown
from quotas.domain.leases import TokenLease
from quotas.domain.policy import Limits, calendar_windows
from quotas.models import AlertEvent, AlertRule, Outbox
from tests.support.gateways import eventually, gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

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
