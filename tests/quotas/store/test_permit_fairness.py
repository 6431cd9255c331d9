"""The counter store's fairness between users at an upstream (fair shares of the limit, what a user holds beyond its
share while another waits, the breaker that one user cannot open alone): one contract, both stores.

The limit, AIMD and breaker mechanics without users are in tests/streaming/provider/test_permits.py.
"""

import pytest

from quotas.store.base import (OUTCOME_FAILED, OUTCOME_NONE, OUTCOME_OK, PERMIT_ACQUIRED, PERMIT_FULL, PERMIT_OPEN,
                               PermitPolicy)

KEY = "sluice:{up:fair}:upstream"
NOW = 1_000_000.0


def policy(**changes):
    values = dict(min_limit=1, max_limit=4, increase=0.0, decrease_factor=0.5, breaker_threshold=3,
                  breaker_cooldown_seconds=10.0, ttl_seconds=30.0, fair_share=True, demand_seconds=2.0,
                  breaker_min_users=2)
    return PermitPolicy(**{**values, **changes})


async def take(store, user, holder, p=None, now=NOW, waiting=()):
    return await store.acquire_permit(KEY, holder, p or policy(), now, user, waiting)


async def give(store, user, holder, outcome=OUTCOME_OK, p=None, now=NOW):
    return await store.release_permit(KEY, holder, outcome, 4, p or policy(), now, user=user)


# Fair shares ---------------------------------------------------------------------------------------------------


async def test_a_lone_user_may_take_every_permit_and_a_waiting_user_gets_the_next(store):
    assert [(await take(store, "a", f"a{i}")).status for i in range(4)] == [PERMIT_ACQUIRED] * 4
    refused = await take(store, "b", "b1")
    assert (refused.status, refused.over_share) == (PERMIT_FULL, False)  # nothing free: full for everyone
    await give(store, "a", "a0")
    # One permit is free, a holds 3 of 4 and b (waiting) none: two users, a share of 2 each. a yields it.
    again = await take(store, "a", "a4")
    assert (again.status, again.over_share) == (PERMIT_FULL, True)
    assert (await take(store, "b", "b1")).status == PERMIT_ACQUIRED


async def test_a_user_below_its_share_takes_a_free_permit_even_while_others_wait(store):
    for i in range(3):
        await take(store, "a", f"a{i}")
    # c waits in b's process: three users, a share of 1 each. b has none: the last permit is b's, first come.
    assert (await take(store, "b", "b1", waiting=("c",))).status == PERMIT_ACQUIRED
    refused = await take(store, "c", "c1")
    assert (refused.status, refused.over_share) == (PERMIT_FULL, False)


async def test_the_users_a_process_reports_waiting_keep_their_share(store):
    await take(store, "a", "a1")
    await take(store, "a", "a2")
    # b waits in the caller's process (it has not reached the store itself): a, at its share of 2, yields.
    refused = await take(store, "a", "a3", waiting=("b",))
    assert (refused.status, refused.over_share) == (PERMIT_FULL, True)
    assert (await take(store, "b", "b1")).status == PERMIT_ACQUIRED


async def test_a_users_recent_demand_is_kept_free_for_a_while_then_given_to_others(store):
    # b ran two requests at once and just gave both back (a client that sends its next one at once).
    for holder in ("b1", "b2"):
        await take(store, "b", holder)
    for holder in ("b1", "b2"):
        await give(store, "b", holder)
    assert [(await take(store, "a", f"a{i}")).status for i in range(2)] == [PERMIT_ACQUIRED] * 2
    refused = await take(store, "a", "a2", now=NOW + 1)
    assert (refused.status, refused.over_share) == (PERMIT_FULL, True)
    assert (await take(store, "b", "b3", now=NOW + 1)).status == PERMIT_ACQUIRED
    # b goes quiet: once its demand is forgotten (demand_seconds after its last permit), a may use it all.
    await give(store, "b", "b3", now=NOW + 1)
    assert (await take(store, "a", "a2", now=NOW + 3.5)).status == PERMIT_ACQUIRED
    assert (await take(store, "a", "a3", now=NOW + 3.5)).status == PERMIT_ACQUIRED


async def test_a_light_user_keeps_room_for_what_it_uses_not_its_whole_share(store):
    await take(store, "c", "c1")  # c holds one and has never wanted more
    statuses = [(await take(store, "a", f"a{i}")).status for i in range(3)]
    assert statuses == [PERMIT_ACQUIRED] * 3  # a's share is 2, but c's unused one is a's to use


async def test_no_fair_shares_without_the_policy_or_a_limit(store):
    for p in (policy(fair_share=False), policy(max_limit=0)):
        # b waits (with fair shares a would stop at its share of 2): a takes the whole limit.
        results = [await take(store, "a", f"a{i}-{p.max_limit}", p, waiting=("b",)) for i in range(4)]
        assert all(r.status == PERMIT_ACQUIRED for r in results)
        for i in range(4):
            await give(store, "a", f"a{i}-{p.max_limit}", p=p)


# What a user holds beyond its share --------------------------------------------------------------------------


async def test_excess_names_who_holds_beyond_its_share_while_another_waits(store):
    for i in range(4):
        await take(store, "a", f"a{i}")
    assert await store.permit_excess(KEY, policy(), NOW) == {}  # nobody else wants any
    await take(store, "b", "b1")  # refused: b waits
    assert await store.permit_excess(KEY, policy(), NOW) == {"a": 2}
    await give(store, "a", "a0")
    await give(store, "a", "a1")
    assert (await take(store, "b", "b1")).status == PERMIT_ACQUIRED
    assert await store.permit_excess(KEY, policy(), NOW) == {}  # b got a permit and waits no more
    assert await store.permit_excess(KEY, policy(fair_share=False), NOW) == {}


async def test_a_renewed_permit_stays_its_users(store):
    for i in range(4):
        await take(store, "a", f"a{i}")
    for i in range(4):
        assert await store.renew_permit(KEY, f"a{i}", 30, NOW + 20)
    # Past the permits' first TTL and a's contention memory: the renewed permits are still a's.
    await take(store, "b", "b1", now=NOW + 31)
    assert await store.permit_excess(KEY, policy(), NOW + 31) == {"a": 2}


# The breaker: one user's failures cannot open it for others ---------------------------------------------------


async def fail(store, user, holder, p=None, now=NOW):
    result = await take(store, user, holder, p, now)
    assert result.status == PERMIT_ACQUIRED, result
    await give(store, user, holder, OUTCOME_FAILED, p, now)


async def test_one_users_failures_open_only_its_own_breaker(store):
    for i in range(3):
        await fail(store, "x", f"x{i}")
    own = await take(store, "x", "x3", now=NOW + 1)
    assert (own.status, own.own) == (PERMIT_OPEN, True) and own.retry_after_seconds == pytest.approx(9)
    assert (await take(store, "y", "y1", now=NOW + 1)).status == PERMIT_ACQUIRED  # the shared breaker is closed
    await give(store, "y", "y1", now=NOW + 1)
    # After the cooldown one more failure reopens x's breaker; a success closes it.
    await fail(store, "x", "x4", now=NOW + 10)
    assert (await take(store, "x", "x5", now=NOW + 11)).own
    assert (await take(store, "x", "x5", now=NOW + 20)).status == PERMIT_ACQUIRED
    await give(store, "x", "x5", now=NOW + 20)
    await fail(store, "x", "x6", now=NOW + 20)
    assert (await take(store, "x", "x7", now=NOW + 20)).status == PERMIT_ACQUIRED


async def test_failures_of_two_users_open_the_shared_breaker(store):
    for i in range(3):
        await fail(store, "x", f"x{i}")  # two count towards the shared breaker (ceil(3 / 2)); x's own opens
    await fail(store, "y", "y1")  # the third
    shared = await take(store, "z", "z1", now=NOW + 1)
    assert (shared.status, shared.own) == (PERMIT_OPEN, False) and shared.retry_after_seconds == pytest.approx(9)


async def test_a_success_starts_a_new_run_for_every_user(store):
    await fail(store, "x", "x1")
    await fail(store, "x", "x2")
    await take(store, "y", "y1")
    await give(store, "y", "y1")  # the provider answered: the run of failures ends
    await fail(store, "x", "x3")
    await fail(store, "y", "y2")
    assert (await take(store, "z", "z1")).status == PERMIT_ACQUIRED  # two in the new run, of three


async def test_refusals_and_rejections_are_not_failures(store):
    for i in range(10):  # the provider's 4xx to x's requests, or x's clients leaving: no outcome
        await take(store, "x", f"x{i}")
        await give(store, "x", f"x{i}", OUTCOME_NONE)
    assert (await take(store, "x", "x10")).status == PERMIT_ACQUIRED
    assert (await take(store, "y", "y1")).status == PERMIT_ACQUIRED


async def test_the_probes_success_closes_its_users_own_breaker_too(store):
    for i in range(3):
        await fail(store, "x", f"x{i}")
    await fail(store, "y", "y1")
    probe = await take(store, "x", "probe", now=NOW + 10)
    assert probe.probe
    await give(store, "x", "probe", now=NOW + 10.5)
    await fail(store, "x", "x3", now=NOW + 11)  # one failure: x's own breaker was closed with the shared one
    assert (await take(store, "x", "x4", now=NOW + 11)).status == PERMIT_ACQUIRED


async def test_with_one_user_enough_any_users_failures_open_the_shared_breaker(store):
    p = policy(breaker_min_users=1)
    for i in range(3):
        await fail(store, "x", f"x{i}", p)
    shared = await take(store, "y", "y1", p)
    assert (shared.status, shared.own) == (PERMIT_OPEN, False)
