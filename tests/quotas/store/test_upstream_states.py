"""The counter store's read of upstream records for the dashboard's deployment table: one contract, both stores."""

from quotas.store.base import OUTCOME_FAILED, OUTCOME_THROTTLED, PermitPolicy

NOW = 1_000_000.0
POLICY = PermitPolicy(min_limit=1, max_limit=8, increase=0.0, decrease_factor=0.5, breaker_threshold=2,
                      breaker_cooldown_seconds=10.0, ttl_seconds=30.0)


async def test_states_show_the_limit_the_breaker_and_the_permits_held(store):
    ok, broken = "sluice:{up:ok}:upstream", "sluice:{up:broken}:upstream"
    assert await store.upstream_states([ok, broken], NOW) == {}  # nobody called them: nothing stored
    await store.acquire_permit(ok, "a", POLICY, NOW)
    await store.acquire_permit(ok, "b", POLICY, NOW)
    await store.release_permit(ok, "b", OUTCOME_THROTTLED, 8, POLICY, NOW)  # the limit halves
    for holder in ("c", "d"):
        await store.acquire_permit(broken, holder, POLICY, NOW)
        await store.release_permit(broken, holder, OUTCOME_FAILED, 8, POLICY, NOW)  # two failures: open
    states = await store.upstream_states([ok, broken, "sluice:{up:other}:upstream"], NOW + 1)
    assert set(states) == {ok, broken}
    assert (states[ok].limit, states[ok].open_until, states[ok].permits) == (4.0, 0.0, 1)
    assert (states[broken].open_until, states[broken].permits) == (NOW + 10.0, 0)
    # A permit not renewed within its TTL is not counted as held.
    assert (await store.upstream_states([ok], NOW + 31))[ok].permits == 0
