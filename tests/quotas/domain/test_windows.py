"""quotas/domain/windows.py: a request's windows are reused while they hold, and never outlive their limits or their
day. No database (the limits are plain values); through real gateways: tests/quotas/domain/test_teams.py."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone

from quotas.domain import windows
from quotas.domain.policy import Limits, Pool

LIMITS = Limits(tokens_per_day=1000, tokens_per_month=20000, requests_per_minute=60, concurrent_streams=4,
                max_tokens_per_request=512, allowed_models=(), timezone="Europe/Paris", budget_per_day=10**9,
                pools=(Pool("team", 7, "red", "America/New_York", budget_per_month=5 * 10**9),))
NOON = datetime(2026, 3, 14, 12, 0, tzinfo=timezone.utc)


def test_the_same_limits_on_the_same_day_reuse_the_windows():
    first = windows.template(1, LIMITS, NOON, money=True)
    assert windows.template(1, replace(LIMITS), NOON + timedelta(hours=5), money=True) is first
    assert [(w.owner, w.scope) for w in first.windows] == [("user", "day"), ("user", "month"),
                                                           ("user", "budget_day"), ("team", "budget_month")]
    assert [s.limit for s in first.specs] == [1000, 20000, 10**9, 5 * 10**9]


def test_a_changed_limit_pool_or_zone_gives_new_windows():
    first = windows.template(2, LIMITS, NOON, money=True)
    lower = windows.template(2, replace(LIMITS, budget_per_day=10), NOON, money=True)
    assert [s.limit for s in lower.specs][2] == 10
    team = replace(LIMITS, pools=(replace(LIMITS.pools[0], budget_per_month=3),))
    assert [s.limit for s in windows.template(2, team, NOON, money=True).specs][3] == 3
    left = windows.template(2, replace(LIMITS, pools=()), NOON, money=True)
    assert len(left.windows) == 3 and windows.template(2, LIMITS, NOON, money=True) is first
    tokyo = windows.template(2, replace(LIMITS, timezone="Asia/Tokyo"), NOON, money=True)
    assert tokyo.windows[0].start == datetime(2026, 3, 14, tzinfo=timezone.utc) - timedelta(hours=9)


def test_windows_are_built_again_when_any_of_their_days_ends():
    first = windows.template(3, LIMITS, NOON, money=True)
    # Paris's day ends at 23:00 UTC; New York's (the team's) at 04:00 UTC the next day.
    assert first.valid_until == datetime(2026, 3, 14, 23, 0, tzinfo=timezone.utc)
    late = windows.template(3, LIMITS, datetime(2026, 3, 14, 23, 30, tzinfo=timezone.utc), money=True)
    assert late is not first and late.windows[0].key == "2026-03-15" and late.windows[3].key == "2026-03"
    assert windows.template(3, LIMITS, NOON, money=True).windows[0].key == "2026-03-14"


def test_unpriced_requests_and_other_users_have_windows_of_their_own():
    priced = windows.template(4, LIMITS, NOON, money=True)
    assert len(windows.template(4, LIMITS, NOON, money=False).windows) == 2  # tokens only: no pool token limit
    assert windows.template(5, LIMITS, NOON, money=True).specs[0].key != priced.specs[0].key


def test_limits_that_cannot_be_a_key_are_built_every_time():
    listed = replace(LIMITS, allowed_models=["a"])  # built by hand with a list
    assert windows.template(6, listed, NOON).windows == windows.template(6, listed, NOON).windows
    naive = windows.template(6, LIMITS, NOON.replace(tzinfo=None))
    assert naive.windows[0].key == windows.template(6, LIMITS, NOON).windows[0].key
