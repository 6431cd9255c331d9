"""Reads: a caller's limits, and the ledger's state of a token window. Services write (STYLE.md, HackSoft).

`caller_limits` is the one way a user's limits are built from the database: authentication (quotas/domain/keys.py)
and the refresh of a running stream's lease (quotas/domain/leases.py) both call it.
"""

from datetime import timedelta
from types import SimpleNamespace

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import F, Sum

from ..models import Plan, Usage
from .db import PreparedQuery, database
from .policy import LIMIT_FIELDS, Limits

QUOTA_FIELDS = (*LIMIT_FIELDS, "suspended", "timezone")
# The user's quota record and its plan (LEFT JOINs: a user may have no record), in one query.
LIMIT_COLUMNS = ("quota__id", *(f"quota__{name}" for name in QUOTA_FIELDS),
                 *(f"quota__plan__{name}" for name in LIMIT_FIELDS))
# A ledger row's tokens (the provider's truth, or Sluice's count), and what the user's windows were charged for it.
TOKENS = F("prompt_tokens") + F("completion_tokens")
CHARGED = F("charged_tokens")

# Compiled once per database thread (quotas/domain/db.py): it runs on every authenticated request.
_limits_row = PreparedQuery(lambda user_id: get_user_model().objects.filter(pk=user_id).values_list(*LIMIT_COLUMNS),
                            -1)


def default_plan() -> Plan:
    plan = Plan.objects.filter(is_default=True).first()
    if plan is None:
        plan = Plan.objects.get_or_create(name="default", defaults={"is_default": True})[0]
    return plan


def caller_limits(user_id) -> Limits:
    """The user's plan with its per-user overrides; a user without a quota record gets the default plan.

    Sync (a database thread: `db.run`, or `limits_of` from async code).
    """
    rows = _limits_row.rows(user_id)
    if not rows or rows[0][0] is None:
        return Limits.combine(default_plan())
    values = rows[0][1:]
    quota = SimpleNamespace(**dict(zip(QUOTA_FIELDS, values[:len(QUOTA_FIELDS)])))
    plan = SimpleNamespace(**dict(zip(LIMIT_FIELDS, values[len(QUOTA_FIELDS):])))
    return Limits.combine(plan, quota)


limits_of = database(caller_limits)


@database
def ledger_states(user_id, windows, now_dt):
    """`ledger_state` of several windows, from one snapshot of the ledger (one transaction, REPEATABLE READ on
    PostgreSQL; SQLite's transactions read one snapshot anyway) and one `now_dt`. Read one by one, a request that
    settled in between, or whose heartbeat crossed the liveness line in between, was counted by one window's rebuild
    and not by the other's (tests/test_chaos.py: a month window 41 tokens under the ledger, the day's exact)."""
    outermost = not connection.in_atomic_block  # (a test's own transaction: its snapshot is set already)
    with transaction.atomic():
        if connection.vendor == "postgresql" and outermost:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return [_ledger_state(user_id, window, now_dt) for window in windows]


@database
def ledger_state(user_id, window, now_dt):
    return _ledger_state(user_id, window, now_dt)


def _ledger_state(user_id, window, now_dt):
    """(used, {request_id: reserved}) of one window, from the ledger: what a missing counter record holds.

    A money window (a budget's) in nanos: the settled rows' `charged_nanos`, the running rows' `reserved_nanos`
    (unpriced rows have neither: they count nothing)."""
    charged, reserved = ("charged_nanos", "reserved_nanos") if window.is_money else ("charged_tokens",
                                                                                    "reserved_tokens")
    rows = Usage.objects.filter(user_id=user_id, counted=True)
    rows = rows.filter(day=window.start.date()) if window.period == "day" else rows.filter(month=window.key)
    # A settled row counts what it was charged (a provider may report more than the windows allowed: the ledger keeps
    # the report, the windows the charge).
    finished = rows.exclude(status=Usage.Status.STREAMING).aggregate(tokens=Sum(charged, default=0))
    # Requests still running hold their reservation. A row whose process has been silent for longer than a lease
    # lives holds nothing here: another process settles it and charges it then (ledger.claim_abandoned).
    alive_since = now_dt - timedelta(seconds=settings.QUOTA_SLOT_TTL)
    running = rows.filter(status=Usage.Status.STREAMING, heartbeat_at__gte=alive_since)
    leases = {request_id: amount or 0 for request_id, amount in running.values_list("request_id", reserved)}
    return finished["tokens"], leases
