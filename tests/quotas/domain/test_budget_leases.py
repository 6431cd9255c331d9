"""Money budgets in a token lease (issue 18, item 2 per user): the arithmetic, on the real in-process store and the
test database. End to end, with gateway processes on Redis: tests/quotas/domain/test_budgets.py."""

from decimal import Decimal
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas.domain import policy
from quotas.domain.exceptions import QuotaExceeded
from quotas.domain.leases import TokenLease
from quotas.domain.money import NANOS, Price, as_nanos, cost_nanos, price_from_record
from quotas.domain.policy import Limits

pytestmark = pytest.mark.django_db(transaction=True)

# 1 per million input tokens, 4 per million output tokens: 1,000 and 4,000 nanos a token.
PRICE = Price(input=Decimal("1"), output=Decimal("4"))


def limits(day=None, month=None, tokens=1_000_000):
    return Limits(tokens_per_day=tokens, tokens_per_month=tokens, requests_per_minute=60, concurrent_streams=10,
                  max_tokens_per_request=4096, allowed_models=(), budget_per_day=day, budget_per_month=month)


@pytest.fixture
def user_id():
    return get_user_model().objects.create_user(f"budget-user-{timezone.now().timestamp()}").pk


def test_budgets_combine_in_nanos_and_an_override_replaces_the_plans():
    plan = SimpleNamespace(tokens_per_day=1, tokens_per_month=1, requests_per_minute=1, concurrent_streams=1,
                           max_tokens_per_request=1, allowed_models=[], budget_per_day=Decimal("0.5"),
                           budget_per_month=None)
    assert (Limits.combine(plan).budget_per_day, Limits.combine(plan).budget_per_month) == (NANOS // 2, None)
    override = SimpleNamespace(budget_per_day=None, budget_per_month=Decimal("12.000000001"), suspended=False)
    combined = Limits.combine(plan, override)
    assert (combined.budget_per_day, combined.budget_per_month) == (500_000_000, 12 * NANOS + 1)
    assert as_nanos(Decimal("0.0000000019")) == 1  # rounded down: a budget is never widened


def test_money_windows_only_with_a_budget_and_a_price(user_id):
    now = timezone.now()
    assert len(TokenLease(user_id, limits(day=NANOS), "r1", now).windows) == 2  # unpriced model: costs nothing
    assert len(TokenLease(user_id, limits(), "r2", now, PRICE).windows) == 2  # no budget
    lease = TokenLease(user_id, limits(month=NANOS), "r3", now, PRICE)
    assert [w.scope for w in lease.windows] == ["day", "month", "budget_month"]
    both = TokenLease(user_id, limits(day=1, month=2), "r4", now, PRICE)
    assert [(w.scope, w.limit) for w in both.windows[2:]] == [("budget_day", 1), ("budget_month", 2)]
    # Distinct records from the token windows'.
    assert len({spec.key for spec in both.specs}) == 4
    assert policy.window_limit(both.windows[2], limits(day=7)) == 7
    assert policy.window_limit(both.windows[3], limits(day=7)) == policy.NO_BUDGET


async def test_admission_leases_the_prompt_at_the_input_rate_and_the_completion_at_the_output_rate(user_id):
    # 1,000,000 nanos: 100 prompt tokens (100,000) leave 900,000, i.e. 225 completion tokens at 4,000.
    lease = TokenLease(user_id, limits(day=1_000_000), "req_rates", timezone.now(), PRICE)
    max_tokens = await lease.admit(prompt_tokens=100, requested_max=None, stream=True)
    assert lease.held == 100 + 32
    assert lease.held_units == [132, 132, 100 * 1000 + 32 * 4000]
    assert lease.held_nanos == 228_000
    assert lease.remaining == (1_000_000 - 228_000) // 4000 == 193
    assert max_tokens == 225  # the first block plus what remains, at the output rate
    assert lease.reserved_nanos(100, 225) == 1_000_000
    await lease.settle(lease.held, cost_nanos(PRICE, 100, 32))


async def test_a_stream_is_cut_where_the_budget_runs_out_and_never_charged_past_it(user_id):
    budget = 500_000  # 100 prompt tokens, then 100 completion tokens at 4,000
    first = TokenLease(user_id, limits(day=budget), "req_cut", timezone.now(), PRICE)
    await first.admit(prompt_tokens=100, requested_max=1000, stream=True)
    covered = 32
    while await first.need(1):
        covered = first.completion_leased
    assert first.completion_leased == 100 and first.held_nanos == budget
    refusal = first.exhausted()
    assert isinstance(refusal, QuotaExceeded) and refusal.scope == "budget_day"
    assert refusal.resets_at == first.windows[2].end
    # The provider reports more than was leased: the money windows are charged what the lease holds, no more.
    charges, nanos = first.charges(first.held, cost_nanos(PRICE, 150, 120))
    assert nanos == budget and charges == [200, 200, budget]
    await first.settle(first.held, cost_nanos(PRICE, 150, 120))
    # Nothing left for anyone: a second request is refused at admission, naming the budget.
    second = TokenLease(user_id, limits(day=budget), "req_after", timezone.now(), PRICE)
    with pytest.raises(QuotaExceeded) as refused:
        await second.admit(prompt_tokens=10, requested_max=10, stream=True)
    assert refused.value.scope == "budget_day"
    assert covered <= 100


async def test_a_cheaper_request_is_charged_its_cost_and_the_rest_returned(user_id):
    lease = TokenLease(user_id, limits(month=10 * NANOS), "req_cost", timezone.now(), PRICE)
    await lease.admit(prompt_tokens=10, requested_max=100, stream=True)
    cost = cost_nanos(PRICE, 10, 5)
    assert lease.charges(15, cost) == ([15, 15, cost], cost)
    await lease.settle(15, cost)
    after = TokenLease(user_id, limits(month=10 * NANOS), "req_next", timezone.now(), PRICE)
    await after.admit(prompt_tokens=10, requested_max=100, stream=False)
    # The tightest window, in tokens at the output rate: the token day's here (1,000,000 - 15 - 110)...
    assert after.remaining == 1_000_000 - 15 - 110
    await after.release()
    # ... the budget's when it is the tighter.
    tight = TokenLease(user_id, limits(month=NANOS // 1000, tokens=10**8), "req_tight", timezone.now(), PRICE)
    await tight.admit(prompt_tokens=10, requested_max=100, stream=False)
    assert tight.remaining == (NANOS // 1000 - cost - 10 * 1000 - 100 * 4000) // 4000
    await tight.release()


def test_a_ledger_price_record_round_trips():
    price = Price(input=Decimal("2.5"), output=Decimal("10"), reasoning=Decimal("12"), id=3)
    assert price_from_record(price.as_record()) == price
    assert price_from_record(None) is None


@pytest.fixture
def redis_store(redis_url):
    """The real Redis store for one test (EVALSHA calls counted from Redis's own statistics)."""
    import redis
    from django.test import override_settings

    from quotas.store import get_store, reset_stores

    with override_settings(SLUICE_COUNTER_STORE="quotas.store.redis.RedisStore", REDIS_URL=redis_url,
                           CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url}}):
        reset_stores()
        client = redis.Redis.from_url(redis_url)
        yield lambda: client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        reset_stores()


@pytest.mark.redis
async def test_admission_with_money_is_one_store_call_when_the_prompt_and_first_block_fit(user_id, redis_store):
    """Issue 20, item 5 (budgets keep their cost): the prompt at the input rate and the first block at the output rate
    in one script; near the limit, one by one as before (the bundle refused: nothing held)."""
    from quotas.store import get_store

    seeded = TokenLease(user_id, limits(day=10**9), "req_seed", timezone.now(), PRICE)
    await seeded.admit(prompt_tokens=8, requested_max=None, stream=True)  # windows created from the ledger
    await seeded.settle(0)
    before = redis_store()
    lease = TokenLease(user_id, limits(day=10**9), "req_bundle", timezone.now(), PRICE)
    await lease.admit(prompt_tokens=100, requested_max=None, stream=True)
    assert redis_store() - before == 1
    assert lease.held == 132 and lease.held_units[-1] == 100 * 1000 + 32 * 4000
    assert (await get_store().usage(lease.specs[-1].key, 0))[1] == 228_000  # what the window holds for it
    await lease.settle(lease.held, cost_nanos(PRICE, 100, 32))
    # 150,000 nanos left: the prompt (100,000) fits, 32 completion tokens (128,000) do not — 12 do.
    used = (await get_store().usage(lease.specs[-1].key, 0))[0]
    tight = TokenLease(user_id, limits(day=used + 150_000), "req_tight", timezone.now(), PRICE)
    before = redis_store()
    assert await tight.admit(prompt_tokens=100, requested_max=None, stream=True) == 12
    assert redis_store() - before == 3  # the bundle refused, then the prompt, then what is left of the block
    assert tight.held_units[-1] == 100 * 1000 + 12 * 4000
    await tight.settle(0)
