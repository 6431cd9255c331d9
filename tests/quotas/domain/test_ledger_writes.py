"""quotas/domain/ledger.py `record_progress`: a running request's sign of life and progress in one statement (issue
20, item 4: the ledger's writes per request, bench/bench_ledger.py), never lowered, nothing once settled."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from quotas.domain import ledger
from quotas.domain.policy import Limits, calendar_windows
from quotas.models import Usage

pytestmark = pytest.mark.django_db


@pytest.fixture
def row(django_user_model):
    user = django_user_model.objects.create_user("progress")
    opened = ledger.ledger_row(request_id="req_progress", user_id=user.pk, api_key_id=None, model="m", stream=True,
                               reserved_tokens=100, windows=calendar_windows(Limits(0, 0, 0, 0, 0, ()), timezone.now()))
    return ledger.open_ledger.sync(opened)


def test_progress_is_one_statement_and_never_lowered(row):
    first = Usage.objects.get(pk=row.pk).heartbeat_at
    with CaptureQueriesContext(connection) as captured:
        ledger.record_progress.sync(row.pk, 40)
    assert len(captured.captured_queries) == 1
    after = Usage.objects.get(pk=row.pk)
    assert after.completion_tokens == 40 and after.heartbeat_at >= first
    ledger.record_progress.sync(row.pk, 30)  # a late write of an earlier count
    assert Usage.objects.get(pk=row.pk).completion_tokens == 40
    ledger.record_progress.sync(row.pk, 55)
    assert Usage.objects.get(pk=row.pk).completion_tokens == 55


def test_a_settled_row_takes_no_more_progress(row):
    ledger.close_ledger.sync(row, status=Usage.Status.COMPLETED, completion_tokens=50, charged_tokens=150)
    settled = Usage.objects.get(pk=row.pk)
    ledger.record_progress.sync(row.pk, 90)
    after = Usage.objects.get(pk=row.pk)
    assert (after.completion_tokens, after.heartbeat_at) == (50, settled.heartbeat_at)


def _rich_row(user, request_id, started_at):
    from decimal import Decimal

    from quotas.domain.money import Price

    price = Price(input=Decimal("1.25"), output=Decimal("4"))
    return ledger.ledger_row(request_id=request_id, user_id=user.pk, api_key_id=None, model="m-priced", stream=False,
                             reserved_tokens=1234, reserved_nanos=98_765_432_101_234, price=price,
                             windows=calendar_windows(Limits(0, 0, 0, 0, 0, ()), started_at), started_at=started_at)


def _values(request_id):
    return {k: v for k, v in Usage.objects.filter(request_id=request_id).values().get().items()
            if k not in ("id", "request_id")}


def test_the_prepared_writes_store_what_the_orm_would(django_user_model):
    # The insert and the settlement are written as SQL of their own (no compilation per request): every column must
    # come out as the ORM's own save and update would have written it (dates, JSON, big integers, booleans, nulls).
    user = django_user_model.objects.create_user("prepared")
    started = timezone.now().replace(microsecond=123456)
    mine, orms = _rich_row(user, "req_prepared", started), _rich_row(user, "req_orm", started)
    with CaptureQueriesContext(connection) as captured:
        ledger.open_ledger.sync(mine)
    assert len(captured.captured_queries) == 1 and mine.pk
    orms.heartbeat_at = mine.heartbeat_at
    orms.save(force_insert=True)
    assert _values("req_prepared") == _values("req_orm")
    ending = {"status": Usage.Status.COMPLETED, "reason": "", "prompt_tokens": 12, "completion_tokens": 345,
              "usage_reported": True, "charged_tokens": 357, "deployment": "dep-1", "cached_tokens": None,
              "reasoning_tokens": 7, "cost_nanos": 2_000_000_000_123, "charged_nanos": 2_000_000_000_123,
              "bytes_sent": 5_000_000_000, "time_to_first_token_ms": 41, "ended_at": started + timezone.timedelta(seconds=3)}
    assert ledger.close_ledger.sync(mine, **ending) is True
    Usage.objects.filter(pk=orms.pk).update(**ending, reserved_tokens=0, reserved_nanos=0, duration_ms=3000)
    assert _values("req_prepared") == _values("req_orm")
    assert _values("req_prepared")["duration_ms"] == 3000
    # Settled once: a second settlement (another process took it for dead) changes nothing and says so.
    assert ledger.close_ledger.sync(mine, status=Usage.Status.CLIENT_DISCONNECTED) is False
    assert Usage.objects.get(pk=mine.pk).status == Usage.Status.COMPLETED
