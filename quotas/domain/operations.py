"""Operator actions: the writes the admin makes on an operator's behalf, each with its audit entry.

Services, not admin code (STYLE.md: services write, the admin is one interface over them).
"""

from asgiref.sync import async_to_sync
from django.db import transaction
from django.db.models import Q, Sum

from ..models import AuditEntry, Usage, UserQuota
from ..store import get_store
from .windows import window_specs
from .policy import Limits
from .selectors import CHARGED

Action = AuditEntry.Action


@transaction.atomic
def set_plan(actor, quotas, plan):
    moving = [q for q in quotas.select_related("user", "plan") if q.plan_id != plan.pk]
    UserQuota.objects.filter(pk__in=[q.pk for q in moving]).update(plan=plan)
    AuditEntry.objects.bulk_create(
        AuditEntry.entry(actor, Action.PLAN_CHANGED, q, {"plan": q.plan.name}, {"plan": plan.name}) for q in moving)
    return len(moving)


@transaction.atomic
def set_suspended(actor, quotas, suspended):
    changing = list(quotas.filter(suspended=not suspended).select_related("user", "plan"))
    UserQuota.objects.filter(pk__in=[q.pk for q in changing]).update(suspended=suspended)
    action = Action.SUSPENDED if suspended else Action.UNSUSPENDED
    AuditEntry.objects.bulk_create(
        AuditEntry.entry(actor, action, q, {"suspended": not suspended}, {"suspended": suspended}) for q in changing)
    return len(changing)


def reset_windows(actor, quotas, now):
    """Start each user's current day and month afresh: their finished ledger rows stop counting and
    the window records are dropped from the counter store, to be rebuilt from the ledger.

    Streams still running keep their rows counted: a rebuilt window holds their leases.
    """
    keys, entries = [], []
    with transaction.atomic():
        for quota in quotas.select_related("user", "plan"):
            windows, specs = window_specs(quota.user_id, Limits.combine(quota.plan, quota), now)
            day, month = windows
            rows = (Usage.objects.filter(user_id=quota.user_id, counted=True)
                    .exclude(status=Usage.Status.STREAMING).filter(Q(day=day.start.date()) | Q(month=month.key)))
            cleared = rows.aggregate(used_today=Sum(CHARGED, filter=Q(day=day.start.date()), default=0),
                                     used_this_month=Sum(CHARGED, filter=Q(month=month.key), default=0))
            rows.update(counted=False)
            keys += [spec.key for spec in specs]
            entries.append(AuditEntry.entry(actor, Action.WINDOW_RESET, quota, {"day": day.key, "month": month.key,
                                                                                **cleared},
                                            {"used_today": 0, "used_this_month": 0}))
        AuditEntry.objects.bulk_create(entries)
    # After the commit, so that a window rebuilt meanwhile already sees the rows uncounted.
    async_to_sync(_drop_records)(keys)
    return len(entries)


async def _drop_records(keys):
    store = get_store()
    for key in keys:
        await store.delete(key)
