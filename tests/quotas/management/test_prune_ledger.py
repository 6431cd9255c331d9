"""`manage.py prune_ledger` (quotas/domain/retention.py): settled rows older than the kept months go, in batches;
rows any open window may count, rows still streaming and the daily roll-ups stay."""

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from quotas.domain import retention
from quotas.models import DailyUsage, Usage

pytestmark = pytest.mark.django_db


def test_the_cutoff_keeps_whole_months_and_a_day_for_every_time_zone():
    now = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
    assert retention.cutoff(1, now) == datetime(2026, 10, 31, tzinfo=UTC)
    assert retention.cutoff(3, now) == datetime(2026, 8, 31, tzinfo=UTC)
    assert retention.cutoff(12, now) == datetime(2025, 11, 30, tzinfo=UTC)
    assert retention.cutoff(1, datetime(2027, 1, 1, 0, 30, tzinfo=UTC)) == datetime(2026, 11, 30, tzinfo=UTC)
    with pytest.raises(ValueError):
        retention.cutoff(0, now)


def test_old_settled_rows_go_in_batches_and_the_rest_stays(django_user_model, monkeypatch):
    user = django_user_model.objects.create_user("old-usage")
    before = retention.cutoff(3, datetime.now(UTC))

    def row(name, started_at, status=Usage.Status.COMPLETED):
        return Usage.objects.create(request_id=name, user=user, model="m", status=status, started_at=started_at,
                                    day=started_at.date(), month=started_at.strftime("%Y-%m"))

    old = [row(f"old-{n}", before - timedelta(days=n + 1)) for n in range(7)]
    kept = [row("edge", before), row("recent", datetime.now(UTC)),
            row("stuck", before - timedelta(days=400), Usage.Status.STREAMING)]
    DailyUsage.objects.create(user=user, model="m", date=old[0].started_at.date(), requests=7)
    out = StringIO()
    call_command("prune_ledger", "--dry-run", stdout=out)
    assert "7 ledger rows" in out.getvalue() and Usage.objects.count() == 10
    monkeypatch.setattr(retention, "BATCH_SIZE", 3)  # three statements: 3 + 3 + 1
    call_command("prune_ledger", stdout=StringIO())
    assert set(Usage.objects.values_list("request_id", flat=True)) == {r.request_id for r in kept}
    assert DailyUsage.objects.get().requests == 7


def test_keeping_no_month_is_refused():
    with pytest.raises(CommandError, match="keep at least the previous month"):
        call_command("prune_ledger", "--keep-months", "0")
