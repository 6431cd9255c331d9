"""quotas/domain/selectors.py `ledger_states`: a lease's missing windows are rebuilt from one snapshot of the ledger.

A deterministic interleaving: Django's `execute_wrapper` (public API) settles a running request on another connection
right after the day window's queries, before the month's. Read one window at a time, the day counts the request's
reservation and the month its charge — or, with a settlement that lands between, the month misses a request the
day counted (the chaos soak once found a month window 41 tokens under the ledger). Read through `ledger_states`, both
windows see the same ledger. PostgreSQL (REPEATABLE READ): on SQLite a read transaction holds its lock until it
ends, so no settlement can land between its queries (it waits, or times out as "database is locked").
"""

import threading
import uuid

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from quotas.domain import ledger, selectors
from quotas.domain.policy import Limits, calendar_windows
from quotas.models import Usage

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite readers block writers")]

RESERVED = 300
CHARGED = 120


def _running_row(user_id, windows):
    row = ledger.ledger_row(request_id=uuid.uuid4().hex, user_id=user_id, api_key_id=None, model="m", stream=True,
                            reserved_tokens=RESERVED, windows=windows)
    return ledger.open_ledger.sync(row)


def _settle_elsewhere(row_id):
    """The request settles on another connection, committed at once (another process's settlement)."""
    def settle():
        try:
            Usage.objects.filter(pk=row_id).update(status=Usage.Status.COMPLETED, charged_tokens=CHARGED,
                                                   completion_tokens=CHARGED)
        finally:
            close_old_connections()
            connection.close()

    thread = threading.Thread(target=settle)
    thread.start()
    thread.join()


def _settling_after(queries, row_id):
    """An execute wrapper that lets `queries` statements run, then settles the row before the next one."""
    seen = []

    def wrapper(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if "usage" in sql.lower():
            seen.append(sql)
            if len(seen) == queries:
                _settle_elsewhere(row_id)
        return result

    return wrapper


@pytest.fixture
def windows_and_row(make_user):
    caller = make_user(tokens_per_day=10_000)
    windows = calendar_windows(Limits(10_000, 10**9, 60, 4, 4096, ()), timezone.now())
    return caller.user.pk, windows, _running_row(caller.user.pk, windows)


def test_read_one_by_one_a_settlement_between_the_windows_splits_them(windows_and_row):
    """The control: the interleaving is real, and without one snapshot the day and the month disagree."""
    user_id, windows, row = windows_and_row
    now = timezone.now()
    with connection.execute_wrapper(_settling_after(2, row.pk)):  # the day's two queries, then the settlement
        day, month = (selectors.ledger_state.sync(user_id, window, now) for window in windows)
    assert day == (0, {row.request_id: RESERVED})
    assert month == (CHARGED, {})


def test_ledger_states_reads_both_windows_from_one_snapshot(windows_and_row):
    user_id, windows, row = windows_and_row
    with connection.execute_wrapper(_settling_after(2, row.pk)):
        day, month = selectors.ledger_states.sync(user_id, list(windows), timezone.now())
    assert day == month == (0, {row.request_id: RESERVED})
    # The settlement did commit: the next rebuild counts the charge in both.
    day, month = selectors.ledger_states.sync(user_id, list(windows), timezone.now())
    assert day == month == (CHARGED, {})
