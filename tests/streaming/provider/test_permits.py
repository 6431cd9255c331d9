"""The counter store's upstream permits (shared AIMD limit + circuit breaker): one contract, both stores."""

import pytest
from django.test import override_settings

from quotas.store import get_store, reset_stores
from quotas.store.base import (OUTCOME_FAILED, OUTCOME_NONE, OUTCOME_OK, OUTCOME_THROTTLED, PERMIT_ACQUIRED,
                               PERMIT_FULL, PERMIT_OPEN, PermitPolicy)

KEY = "sluice:{up:test}:upstream"
NOW = 1_000_000.0


def policy(**changes):
    values = dict(min_limit=1, max_limit=4, increase=1.0, decrease_factor=0.5, breaker_threshold=3,
                  breaker_cooldown_seconds=10.0, ttl_seconds=30.0)
    return PermitPolicy(**{**values, **changes})


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        with override_settings(SLUICE_COUNTER_STORE="quotas.store.memory.MemoryStore"):
            reset_stores()
            yield get_store()
        reset_stores()
        return
    url = request.getfixturevalue("redis_url")
    with override_settings(SLUICE_COUNTER_STORE="quotas.store.redis.RedisStore", REDIS_URL=url,
                           CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}}):
        reset_stores()
        store = get_store()
        yield store
        await store.client.aclose()
    reset_stores()


async def take(store, holder, p=None, now=NOW):
    return await store.acquire_permit(KEY, holder, p or policy(), now)


async def test_permits_up_to_the_limit_idempotent_per_holder(store):
    results = [await take(store, h) for h in "abcde"]
    assert [r.status for r in results] == [PERMIT_ACQUIRED] * 4 + [PERMIT_FULL]
    assert [r.active for r in results] == [1, 2, 3, 4, 4]
    assert results[0].limit == 4  # the limit starts at its maximum
    again = await take(store, "a")
    assert (again.status, again.active) == (PERMIT_ACQUIRED, 4)  # the same holder: no second permit
    await store.release_permit(KEY, "b", OUTCOME_NONE, 4, policy(), NOW)
    assert (await take(store, "e")).status == PERMIT_ACQUIRED
    # Releasing a permit that is not held is harmless.
    await store.release_permit(KEY, "zz", OUTCOME_NONE, 4, policy(), NOW)


async def test_permits_expire_unless_renewed(store):
    for holder in "abcd":
        await take(store, holder)
    assert await store.renew_permit(KEY, "a", 30, NOW + 20)
    assert not await store.renew_permit(KEY, "nobody", 30, NOW + 20)
    # At NOW+31 the permits of b, c, d (a crashed worker's) have expired; a's was renewed until NOW+50.
    later = [await take(store, h, now=NOW + 31) for h in "efgh"]
    assert [r.status for r in later] == [PERMIT_ACQUIRED] * 3 + [PERMIT_FULL]


async def test_no_limit_when_max_is_zero(store):
    unlimited = policy(max_limit=0)
    results = [await take(store, str(i), unlimited) for i in range(50)]
    assert all(r.status == PERMIT_ACQUIRED for r in results)


async def test_429s_cut_the_limit_once_per_epoch_and_successes_grow_it(store):
    p = policy(max_limit=16, min_limit=2)
    admitted = [await take(store, str(i), p) for i in range(16)]
    assert admitted[-1].limit == 16
    # Every request admitted under 16 is throttled: the limit halves once, not sixteen times.
    for i, result in enumerate(admitted[:10]):
        limit = await store.release_permit(KEY, str(i), OUTCOME_THROTTLED, result.limit, p, NOW)
    assert limit == 8
    # A 429 of a request admitted under 8 halves it again; never below min_limit.
    assert await store.release_permit(KEY, "10", OUTCOME_THROTTLED, 8, p, NOW) == 4
    assert await store.release_permit(KEY, "11", OUTCOME_THROTTLED, 4, p, NOW) == 2
    assert await store.release_permit(KEY, "12", OUTCOME_THROTTLED, 2, p, NOW) == 2
    # Additive increase: +1/limit per success, about +1 per round of `limit` successes.
    assert await store.release_permit(KEY, "13", OUTCOME_OK, 2, p, NOW) == pytest.approx(2.5)
    assert await store.release_permit(KEY, "14", OUTCOME_OK, 2, p, NOW) == pytest.approx(2.9)
    # "15" still holds its permit: floor(2.9) = 2 admits one more.
    assert (await take(store, "new", p)).status == PERMIT_ACQUIRED
    assert (await take(store, "newer", p)).status == PERMIT_FULL
    await store.release_permit(KEY, "15", OUTCOME_NONE, 16, p, NOW)
    assert (await take(store, "newer", p)).status == PERMIT_ACQUIRED
    # Errors other than 429 leave the limit alone.
    assert await store.release_permit(KEY, "new", OUTCOME_FAILED, 2, p, NOW) == pytest.approx(2.9)


async def test_the_limit_grows_back_to_its_maximum_and_no_further(store):
    p = policy(max_limit=3)
    for _ in range(20):
        await take(store, "a", p)
        limit = await store.release_permit(KEY, "a", OUTCOME_OK, 3, p, NOW)
    assert limit == 3


async def test_consecutive_failures_open_the_breaker(store):
    p = policy()
    for holder in ("a", "b"):
        await take(store, holder)
        await store.release_permit(KEY, holder, OUTCOME_FAILED, 4, p, NOW)
    # A success (or a 429: the provider answered) resets the count.
    await take(store, "c")
    await store.release_permit(KEY, "c", OUTCOME_THROTTLED, 4, p, NOW)
    for holder in ("d", "e"):
        await take(store, holder)
        await store.release_permit(KEY, holder, OUTCOME_FAILED, 4, p, NOW)
    assert (await take(store, "f")).status == PERMIT_ACQUIRED
    await store.release_permit(KEY, "f", OUTCOME_FAILED, 4, p, NOW + 1)  # the third in a row
    refused = await take(store, "g", now=NOW + 3)
    assert refused.status == PERMIT_OPEN and refused.retry_after_seconds == pytest.approx(8)


async def open_breaker(store, p, now=NOW):
    for i in range(p.breaker_threshold):
        await take(store, f"x{i}", p, now)
        await store.release_permit(KEY, f"x{i}", OUTCOME_FAILED, 4, p, now)
    assert (await take(store, "check", p, now)).status == PERMIT_OPEN


async def test_half_open_lets_one_probe_through_and_its_success_closes(store):
    p = policy()
    await open_breaker(store, p)
    probe = await take(store, "probe", p, NOW + 10)
    assert (probe.status, probe.probe) == (PERMIT_ACQUIRED, True)
    assert (await take(store, "probe", p, NOW + 10.5)).status == PERMIT_ACQUIRED  # idempotent for the probe
    other = await take(store, "other", p, NOW + 11)
    assert other.status == PERMIT_OPEN and other.retry_after_seconds > 0
    # The probe reports its first token without giving the permit back: the breaker closes.
    await store.release_permit(KEY, "probe", OUTCOME_OK, 4, p, NOW + 12, keep=True)
    after = await take(store, "other", p, NOW + 12)
    assert (after.status, after.probe, after.active) == (PERMIT_ACQUIRED, False, 2)


async def test_a_failed_probe_reopens_the_breaker(store):
    p = policy()
    await open_breaker(store, p)
    assert (await take(store, "probe", p, NOW + 10)).probe
    await store.release_permit(KEY, "probe", OUTCOME_FAILED, 4, p, NOW + 11)
    refused = await take(store, "next", p, NOW + 12)
    assert refused.status == PERMIT_OPEN and refused.retry_after_seconds == pytest.approx(9)
    assert (await take(store, "next", p, NOW + 21)).probe


async def test_outcomes_of_other_requests_do_not_move_an_open_breaker(store):
    p = policy()
    await take(store, "old", p)  # a stream that started before the outage
    await open_breaker(store, p)
    await store.release_permit(KEY, "old", OUTCOME_OK, 4, p, NOW + 5)
    assert (await take(store, "new", p, NOW + 6)).status == PERMIT_OPEN


async def test_a_probe_without_a_verdict_or_that_crashed_lets_another_probe(store):
    p = policy()
    await open_breaker(store, p)
    assert (await take(store, "gone", p, NOW + 10)).probe
    await store.release_permit(KEY, "gone", OUTCOME_NONE, 4, p, NOW + 11)  # its client went away
    assert (await take(store, "crashes", p, NOW + 12)).probe
    # A crashed worker's probe expires with its permit's TTL.
    assert (await take(store, "later", p, NOW + 12 + 31)).probe


async def test_breaker_disabled_by_a_zero_threshold(store):
    p = policy(breaker_threshold=0)
    for i in range(10):
        await take(store, str(i), p)
        await store.release_permit(KEY, str(i), OUTCOME_FAILED, 4, p, NOW)
    assert (await take(store, "next", p)).status == PERMIT_ACQUIRED
