"""The counter store contract: the same tests against the in-process store and Redis."""

import asyncio
import dataclasses
import time

import pytest

from quotas.store import WindowSpec


def window(key="w", limit=100, expire_in=3600):
    return WindowSpec(key=f"test:{key}", limit=limit, expire_at=time.time() + expire_in)


async def test_rate_counts_up_to_the_limit_then_refuses_without_counting(store):
    now = 1000.0
    results = [await store.hit("test:rpm", 3, 60, now + i) for i in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0, 0]
    assert results[3].reset_seconds == pytest.approx(57)
    # The window slides: the first request leaves at 1060.
    assert (await store.hit("test:rpm", 3, 60, 1060.5)).allowed
    assert (await store.peek_rate("test:rpm", 3, 60, 1060.6)).remaining == 0


async def test_a_refusals_retry_after_is_the_truth(store):
    # A client refused for the rate that waits as Retry-After says (rounded up to whole seconds) gets in.
    import math

    now = 2000.25
    for i in range(3):
        assert (await store.hit("test:rpm", 3, 60, now + i * 7.3)).allowed
    refused = await store.hit("test:rpm", 3, 60, now + 30)
    assert not refused.allowed and refused.member is None
    assert not (await store.hit("test:rpm", 3, 60, now + 30 + refused.reset_seconds - 0.01)).allowed
    assert (await store.hit("test:rpm", 3, 60, now + 30 + math.ceil(refused.reset_seconds))).allowed


async def test_unhit_gives_one_counted_request_back(store):
    now = 3000.0
    hits = [await store.hit("test:rpm", 2, 60, now + i) for i in range(2)]
    assert all(h.allowed and h.member for h in hits)
    assert not (await store.hit("test:rpm", 2, 60, now + 2)).allowed
    await store.unhit("test:rpm", hits[1].member)
    await store.unhit("test:rpm", hits[1].member)  # twice: nothing more
    assert (await store.peek_rate("test:rpm", 2, 60, now + 3)).remaining == 1
    assert (await store.hit("test:rpm", 2, 60, now + 3)).allowed
    assert not (await store.hit("test:rpm", 2, 60, now + 4)).allowed


async def test_slots_are_limited_idempotent_released_and_expire(store):
    now = 1000.0
    assert (await store.acquire_slot("test:slots", "a", 2, 30, now)).acquired
    assert (await store.acquire_slot("test:slots", "a", 2, 30, now)).active == 1  # same holder: no second slot
    assert (await store.acquire_slot("test:slots", "b", 2, 30, now)).acquired
    refused = await store.acquire_slot("test:slots", "c", 2, 30, now)
    assert (refused.acquired, refused.active) == (False, 2)
    await store.release_slot("test:slots", "a")
    assert (await store.acquire_slot("test:slots", "c", 2, 30, now)).acquired
    # A crashed worker's slot frees itself after its TTL; a renewed one does not.
    await store.renew([], "test:slots", "c", now + 20, 30)
    assert (await store.acquire_slot("test:slots", "d", 2, 30, now + 31)).acquired
    assert not (await store.acquire_slot("test:slots", "e", 2, 30, now + 31)).acquired


async def test_lease_names_missing_windows_until_seeded(store):
    w = window()
    result = await store.lease([w], "r1", 0, 10, 1000.0, 30)
    assert (result.granted, result.missing) == (0, (w.key,))
    await store.seed(w, used=40, leases={}, now=1000.0, ttl=30)
    assert await store.usage(w.key, 1000.0) == (40, 0)
    result = await store.lease([w], "r1", 0, 10, 1000.0, 30)
    assert (result.granted, result.remaining) == (10, (50,))
    assert await store.usage(w.key, 1000.0) == (40, 10)


async def test_lease_grants_what_every_window_has_left(store):
    day, month = window("d", 100), window("m", 30)
    for w in (day, month):
        await store.seed(w, used=0, leases={}, now=1000.0, ttl=30)
    assert (await store.lease([day, month], "r1", 0, 25, 1000.0, 30)).granted == 25
    # r2 wants 25 but the month has 5 left.
    result = await store.lease([day, month], "r2", 0, 25, 1000.0, 30)
    assert (result.granted, result.remaining) == (5, (70, 0))
    assert (await store.lease([day, month], "r3", 0, 1, 1000.0, 30)).granted == 0


async def test_settle_charges_what_was_used_and_returns_the_rest(store):
    w = window(limit=100)
    await store.seed(w, 0, {}, 1000.0, 30)
    await store.lease([w], "r1", 0, 60, 1000.0, 30)
    await store.settle([w], "r1", 22)
    assert await store.usage(w.key, 1000.0) == (22, 0)
    # Settling twice (or a holder the window does not know) charges nothing more.
    await store.settle([w], "r1", 22)
    assert await store.usage(w.key, 1000.0) == (22, 0)


async def test_a_seeded_placeholder_is_replaced_not_added_to(store):
    """A window rebuilt from the ledger holds a running request's reservation; its next lease corrects it."""
    w = window(limit=100)
    await store.seed(w, used=10, leases={"r1": 50}, now=1000.0, ttl=30)
    assert await store.usage(w.key, 1000.0) == (10, 50)
    # r1 really holds 20 and asks for 10 more: its lease becomes 30, not 50 + 30.
    result = await store.lease([w], "r1", 20, 10, 1000.0, 30)
    assert result.granted == 10
    assert await store.usage(w.key, 1000.0) == (10, 30)


async def test_seed_leaves_an_existing_window_alone(store):
    w = window()
    await store.seed(w, 5, {}, 1000.0, 30)
    await store.seed(w, 99, {}, 1000.0, 30)
    assert await store.usage(w.key, 1000.0) == (5, 0)


async def test_renew_says_whether_every_window_still_holds_the_lease(store):
    # Admission checks its lease this way once its ledger row is in (TokenLease.confirm): a window dropped and
    # rebuilt from a ledger that did not show the row yet has lost the lease. Two hash tags: two slots on a cluster.
    user, team = window("{u7}:day", limit=100), window("{t3}:day", limit=100)
    for w in (user, team):
        await store.seed(w, 0, {}, 1000.0, 30)
    assert (await store.lease([user, team], "r1", 0, 40, 1000.0, 30)).granted == 40
    assert await store.renew([user, team], None, "r1", 1001.0, 30) is True
    # A placeholder seeded for the holder (a rebuild that saw its row) counts as holding it.
    await store.delete(team.key)
    await store.seed(team, 0, {"r1": 60}, 1002.0, 30)
    assert await store.renew([user, team], None, "r1", 1003.0, 30) is True
    # Rebuilt without it (the row not yet committed when the ledger was read), or missing: not held.
    await store.delete(user.key)
    assert await store.renew([user, team], None, "r1", 1004.0, 30) is False
    await store.seed(user, 0, {}, 1005.0, 30)
    assert await store.renew([user, team], None, "r1", 1006.0, 30) is False
    assert await store.usage(user.key, 1006.0) == (0, 0)  # a renewal creates nothing
    assert await store.renew([user, team], None, "nobody", 1006.0, 30) is False


async def test_expired_leases_free_their_tokens(store):
    w = window(limit=100)
    await store.seed(w, 0, {}, 1000.0, 30)
    await store.lease([w], "crashed", 0, 90, 1000.0, 30)
    assert (await store.lease([w], "r2", 0, 50, 1010.0, 30)).granted == 10
    # The crashed worker never renews: after its TTL its lease is gone.
    assert (await store.lease([w], "r3", 0, 50, 1031.0, 30)).granted == 50


async def test_concurrent_leases_never_overshoot(store):
    w = window(limit=1000)
    await store.seed(w, 0, {}, 1000.0, 30)

    async def greedy(holder):
        held = 0
        while True:
            result = await store.lease([w], holder, held, 7, 1000.0, 30)
            if not result.granted:
                return held
            held += result.granted

    totals = await asyncio.gather(*(greedy(f"r{i}") for i in range(20)))
    assert sum(totals) == 1000
    used, leased = await store.usage(w.key, 1000.0)
    assert used + leased == 1000


async def test_delete_drops_a_window(store):
    w = window()
    await store.seed(w, 5, {}, 1000.0, 30)
    await store.delete(w.key)
    assert await store.usage(w.key, 1000.0) is None


async def test_a_money_window_grants_the_tokens_its_nanos_allow_at_the_leases_rate(store):
    """A weighted window (WindowSpec.rate: nanos a token): room for left // rate tokens; held and charged per window
    in its own units; the token window beside it as before."""
    tokens = window("t", 1_000)
    money = WindowSpec(key="test:money", limit=10_000_000, expire_at=time.time() + 3600)  # 0.01 in nanos
    for w in (tokens, money):
        await store.seed(w, 0, {}, 1000.0, 30)
    prompt = [tokens, dataclasses.replace(money, rate=2_500)]  # input at 2.5 per million tokens
    result = await store.lease(prompt, "r1", 0, 200, 1000.0, 30)
    assert (result.granted, result.remaining) == (200, (800, 10_000_000 - 500_000))
    output = [tokens, dataclasses.replace(money, rate=10_000)]  # output at 10 per million tokens: 950 tokens left
    result = await store.lease(output, "r1", (200, 500_000), 5_000, 1000.0, 30)
    assert (result.granted, result.remaining) == (800, (0, 10_000_000 - 500_000 - 8_000_000))
    assert await store.usage(money.key, 1000.0) == (0, 8_500_000)
    # Another holder: the money window has 1,500,000 nanos left, 150 output tokens; the token window none.
    assert (await store.lease(output, "r2", 0, 100, 1000.0, 30)).granted == 0
    await store.settle(output, "r1", (900, 7_000_000))
    assert await store.usage(money.key, 1000.0) == (7_000_000, 0)
    assert await store.usage(tokens.key, 1000.0) == (900, 0)
    result = await store.lease([window("t2", 10**6), dataclasses.replace(money, rate=10_000)], "r2", 0, 10**6,
                               1000.0, 30)
    assert result.missing == ("test:t2",)


async def test_a_money_windows_large_amounts_stay_exact(store):
    """Nanos beyond 14 significant digits (a budget of 10 million): held and charged exactly."""
    big = WindowSpec(key="test:big", limit=10**16, expire_at=time.time() + 3600, rate=123_456_789)
    await store.seed(big, 0, {}, 1000.0, 30)
    result = await store.lease([big], "r1", (0,), 10**6, 1000.0, 30)
    assert result.granted == 10**6
    assert await store.usage(big.key, 1000.0) == (0, 123_456_789 * 10**6)
    await store.settle([big], "r1", (123_456_789_012_345,))
    assert await store.usage(big.key, 1000.0) == (123_456_789_012_345, 0)
