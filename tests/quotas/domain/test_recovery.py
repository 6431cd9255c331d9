"""quotas/domain/recovery.py: rows of a lost process are settled by a live one, never past a window's limit."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas.domain import ledger
from quotas.domain.leases import TokenLease, quota_status
from quotas.domain.policy import Limits
from quotas.domain.recovery import settle_abandoned
from quotas.models import Plan, Usage, UserQuota

pytestmark = pytest.mark.django_db(transaction=True)

LIMITS = Limits(tokens_per_day=100, tokens_per_month=10_000, requests_per_minute=60, concurrent_streams=5,
                max_tokens_per_request=4096, allowed_models=())


def lost_row(user, prompt, completion, silent_for):
    """The row of a stream whose process died `silent_for` ago, after recording `completion` tokens sent."""
    now = timezone.now()
    day, month = TokenLease(user.pk, LIMITS, "probe", now).windows
    return Usage.objects.create(request_id=f"req_lost_{user.pk}", user=user, model="sim-small",
                                status=Usage.Status.STREAMING, prompt_tokens=prompt, completion_tokens=completion,
                                reserved_tokens=prompt + 200, started_at=now - silent_for, heartbeat_at=now - silent_for,
                                day=day.start.date(), month=month.key)


@pytest.fixture
def user():
    user = get_user_model().objects.create_user(f"recovery-{timezone.now().timestamp()}")
    plan = Plan.objects.create(name=f"plan-{user.username}", tokens_per_day=LIMITS.tokens_per_day,
                               tokens_per_month=LIMITS.tokens_per_month)
    UserQuota.objects.create(user=user, plan=plan)
    return user


async def test_a_lost_row_is_charged_what_it_owes_when_the_window_has_room(user, settings):
    settings.QUOTA_SLOT_TTL = 2
    row = await _in_thread(lost_row, user, 10, 40, timedelta(seconds=5))
    assert await settle_abandoned() >= 1
    row = await _in_thread(Usage.objects.get, pk=row.pk)
    assert (row.status, row.reason, row.charged_tokens) == ("worker_lost", "worker_lost", 50)
    assert (await quota_status(user.pk, LIMITS))["day"]["used"] == 50


async def test_a_lost_row_never_takes_a_window_past_its_limit(user, settings):
    # Its lease expired before its row was claimed, and another request took that room meanwhile (the chaos soak
    # found this after a gateway SIGKILL): the row owes 110, only 40 are left, 40 are charged.
    settings.QUOTA_SLOT_TTL = 2
    other = TokenLease(user.pk, LIMITS, "req_other", timezone.now())
    await other.admit(prompt_tokens=10, requested_max=50, stream=False)
    await ledger.close_ledger(ledger.ledger_row(request_id="req_other", user_id=user.pk, api_key_id=None,
                                                model="sim-small", stream=False, reserved_tokens=0,
                                                windows=other.windows),
                              status="completed", prompt_tokens=10, completion_tokens=50, charged_tokens=60)
    await other.settle(60)
    row = await _in_thread(lost_row, user, 10, 100, timedelta(seconds=5))
    await settle_abandoned()
    row = await _in_thread(Usage.objects.get, pk=row.pk)
    assert (row.status, row.completion_tokens, row.charged_tokens) == ("worker_lost", 100, 40)
    assert (await quota_status(user.pk, LIMITS))["day"]["used"] == 100  # the limit, not 170


async def _in_thread(fn, *args, **kwargs):
    from asgiref.sync import sync_to_async

    return await sync_to_async(fn, thread_sensitive=False)(*args, **kwargs)
