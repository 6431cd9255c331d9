"""quotas/domain/leases.py: a stream's token lease on the real in-process store and the test database."""

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas.domain.exceptions import QuotaExceeded
from quotas.domain.leases import TokenLease
from quotas.domain.policy import Limits

pytestmark = pytest.mark.django_db(transaction=True)


def limits(day, month):
    return Limits(tokens_per_day=day, tokens_per_month=month, requests_per_minute=60, concurrent_streams=10,
                  max_tokens_per_request=4096, allowed_models=())


@pytest.fixture
def user_id():
    return get_user_model().objects.create_user(f"lease-user-{timezone.now().timestamp()}").pk


async def test_a_cut_mid_stream_names_the_month_when_the_month_ran_out(user_id):
    # Plenty left today, 100 tokens left this month: a second stream takes the rest of the month.
    plan = limits(day=10_000, month=100)
    first = TokenLease(user_id, plan, "req_first", timezone.now())
    await first.admit(prompt_tokens=10, requested_max=None, stream=True)
    second = TokenLease(user_id, plan, "req_second", timezone.now())
    await second.admit(prompt_tokens=10, requested_max=None, stream=True)
    assert not await first.need(100)
    refusal = first.exhausted()
    day, month = first.windows
    assert isinstance(refusal, QuotaExceeded)
    assert (refusal.scope, refusal.resets_at) == ("month", month.end)
    assert refusal.retry_after_seconds == pytest.approx(month.seconds_left(timezone.now()), abs=5)
    assert refusal.retry_after_seconds > day.seconds_left(timezone.now()) or month.end == day.end
    await first.settle(first.held)
    await second.settle(second.held)


async def test_a_cut_mid_stream_names_the_day_when_the_day_ran_out(user_id):
    plan = limits(day=100, month=10_000)
    first = TokenLease(user_id, plan, "req_day_first", timezone.now())
    await first.admit(prompt_tokens=10, requested_max=None, stream=True)
    second = TokenLease(user_id, plan, "req_day_second", timezone.now())
    await second.admit(prompt_tokens=10, requested_max=None, stream=True)
    assert not await first.need(100)
    refusal = first.exhausted()
    assert (refusal.scope, refusal.resets_at) == ("day", first.windows[0].end)
    await first.settle(first.held)
    await second.settle(second.held)


async def test_a_refusal_at_admission_names_the_window_that_is_spent(user_id):
    spent_month = TokenLease(user_id, limits(day=10_000, month=5), "req_admit_month", timezone.now())
    with pytest.raises(QuotaExceeded) as refused:
        await spent_month.admit(prompt_tokens=10, requested_max=50, stream=True)
    assert refused.value.scope == "month"
    # Both spent: the month, whose reset comes last (no retry before it can succeed).
    both = TokenLease(user_id, limits(day=5, month=5), "req_admit_both", timezone.now())
    with pytest.raises(QuotaExceeded) as refused:
        await both.admit(prompt_tokens=10, requested_max=50, stream=True)
    assert refused.value.scope == "month"
