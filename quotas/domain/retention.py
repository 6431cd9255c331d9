"""How long the ledger keeps its rows (docs/operations.md, "Ledger retention"): `manage.py prune_ledger`.

The ledger grows by one row a request. A row is needed while any window may count it — the counter store rebuilds
a window from the ledger (quotas/domain/selectors.py), and a month window in any time zone began at most 14 hours
before the UTC month — and for the operators' views of it (the ledger, the spend page). The day's roll-ups
(DailyUsage: the dashboard's charts) are never pruned. So a cutoff is always the start of a UTC month, at least one
whole month back, less a day: no open window, in any zone, ever counts a pruned row.
"""

from datetime import UTC, datetime, timedelta

from ..models import Usage

BATCH_SIZE = 5_000  # rows deleted per statement: short transactions, no long lock on a busy ledger


def cutoff(keep_months: int, now: datetime) -> datetime:
    """Rows that started before this may be pruned: the first of the UTC month `keep_months` before the current
    one, less a day (a window opens at most 14 hours before its UTC month)."""
    if keep_months < 1:
        raise ValueError("keep at least the previous month: the current month's windows rebuild from it")
    year, month = now.astimezone(UTC).year, now.astimezone(UTC).month - keep_months
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime(year, month, 1, tzinfo=UTC) - timedelta(days=1)


def prunable(before: datetime):
    """Settled rows that started before `before` (a row still streaming is never pruned)."""
    return Usage.objects.filter(started_at__lt=before).exclude(status=Usage.Status.STREAMING)


def prune(before: datetime, batch_size: int | None = None) -> int:
    """Delete `prunable(before)` in batches of `batch_size` (BATCH_SIZE); returns how many rows went."""
    batch_size = batch_size or BATCH_SIZE
    deleted = 0
    while True:
        ids = list(prunable(before).order_by("started_at").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        deleted += Usage.objects.filter(pk__in=ids).delete()[0]
