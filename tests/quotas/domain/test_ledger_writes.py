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
