"""Spend: what the ledger's requests cost over a period, grouped by user, team, API key or model (issue 18, item 6;
docs/operations.md, "Spend").

One grouped query, whatever the number of groups: each group's name is read in the same query through its joins
(a user's username, a team's name, a key's prefix, name and user), never row by row. Amounts stay integers of nanos
(quotas/domain/money.py) until they are shown, so totals and shares are exact. Periods are whole UTC days, like the
daily rollups and the usage dashboard, so every operator reads the same month whatever their own time zone.
"""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Count, F, Sum

from ..models import Usage

# Per grouping, the ledger's columns it groups on: the group's key first, then what names it.
GROUPS = {
    "user": ("user_id", "user__username"),
    "team": ("team_id", "team__name"),
    "key": ("api_key_id", "api_key__prefix", "api_key__name", "api_key__user__username"),
    "model": ("model",),
}


@dataclass(frozen=True)
class SpendRow:
    """One group's figures. `cost_nanos` is None when none of its requests had a price (an unpriced model, a refusal,
    a request still running): unknown, which is not the same as free."""

    group: dict = field(default_factory=dict)  # the GROUPS columns' values; empty for the total
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nanos: int | None = None


@dataclass(frozen=True)
class Spend:
    """A period's groups, most expensive first, and their total."""

    group: str
    rows: list[SpendRow]
    total: SpendRow


def period_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """The UTC instants from the start of `first` to the end of `last` (excluded): a half-open range on started_at,
    which its index serves, where `started_at__date` would not."""
    return datetime.combine(first, time.min, tzinfo=UTC), datetime.combine(last + timedelta(days=1), time.min,
                                                                           tzinfo=UTC)


def spend(first: date, last: date, group: str = "user", *, team_id=None, user_id=None, model=None) -> Spend:
    """The period's requests (every ledger row that started in it: settled, refused or running), grouped by `group`
    (a GROUPS key), most expensive first (groups without any cost last), and their total; optionally only those of
    one team, one user or one model."""
    columns = GROUPS[group]
    start, end = period_bounds(first, last)
    rows = Usage.objects.filter(started_at__gte=start, started_at__lt=end)
    filters = {"team_id": team_id, "user_id": user_id, "model": model}
    rows = rows.filter(**{name: value for name, value in filters.items() if value is not None})
    grouped = (rows.values(*columns).order_by()
               .annotate(requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                         cost=Sum("cost_nanos"))
               # Ties in the same order on every database: a group without a key, team or user (NULL) after the
               # others, which PostgreSQL does by default and SQLite did not (its NULLs sort first).
               .order_by(F("cost").desc(nulls_last=True), "-requests",
                         *(F(column).asc(nulls_last=True) for column in columns)))
    found = [_row(values, columns) for values in grouped]
    return Spend(group, found, _total(found))


def _row(values, columns) -> SpendRow:
    # PostgreSQL sums integers as numeric: back to int, exactly.
    cost = values["cost"]
    return SpendRow(group={name: values[name] for name in columns}, requests=values["requests"],
                    prompt_tokens=int(values["prompt"] or 0), completion_tokens=int(values["completion"] or 0),
                    cost_nanos=None if cost is None else int(cost))


def _total(rows) -> SpendRow:
    """The rows added up (no second query): a cost only when some group has one."""
    costs = [row.cost_nanos for row in rows if row.cost_nanos is not None]
    return SpendRow(requests=sum(row.requests for row in rows), prompt_tokens=sum(row.prompt_tokens for row in rows),
                    completion_tokens=sum(row.completion_tokens for row in rows),
                    cost_nanos=sum(costs) if costs else None)
