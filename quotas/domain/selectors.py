"""Reads: a caller's limits, and the ledger's state of a token window. Services write (STYLE.md, HackSoft).

`caller_limits` is the one way a user's limits are built from the database: authentication (quotas/domain/keys.py)
and the refresh of a running stream's lease (quotas/domain/leases.py) both call it.
"""

from datetime import timedelta
from types import SimpleNamespace

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import F, FilteredRelation, Q, Sum

from ..models import ApiKey, Plan, Usage
from .db import PreparedQuery, database
from .money import as_nanos
from .policy import LIMIT_FIELDS, Limits, Pool

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


def caller_limits(user_id, key_id=None) -> Limits:
    """The user's plan with its per-user overrides; a user without a quota record gets the default plan. With
    `key_id`, narrowed to the key's models and with the key's pools (`key_limits`).

    Sync (a database thread: `db.run`, or `limits_of` from async code).
    """
    rows = _limits_row.rows(user_id)
    if not rows or rows[0][0] is None:
        limits = Limits.combine(default_plan())
    else:
        values = rows[0][1:]
        quota = SimpleNamespace(**dict(zip(QUOTA_FIELDS, values[:len(QUOTA_FIELDS)])))
        plan = SimpleNamespace(**dict(zip(LIMIT_FIELDS, values[len(QUOTA_FIELDS):])))
        limits = Limits.combine(plan, quota)
    if key_id is None:
        return limits
    rows = _key_limits_row.rows(key_id)
    return key_limits(limits, dict(zip(("id", *KEY_COLUMNS), rows[0]))) if rows else limits


# What a key adds to its user's limits: its models, its spend limits, its team's pool and the member's cap in it (the
# membership by a LEFT JOIN, so that authentication still reads the key in one statement).
KEY_COLUMNS = ("allowed_models", "prefix", "budget_per_day", "budget_per_month", "team_id", "team__name",
               "team__timezone", "team__tokens_per_day", "team__tokens_per_month", "team__budget_per_day",
               "team__budget_per_month", "member_id", "member_budget_per_day", "member_budget_per_month")


def with_pool_columns(keys):
    """`keys` (an ApiKey queryset) annotated with the key's membership in its team (member_*): one LEFT JOIN on the
    key's user's membership of the key's team (at most one row: one_membership_per_team), where three correlated
    subqueries, one a column, each looked the membership up again (docs/performance.md, issue 20, item 5)."""
    membership = FilteredRelation("team__memberships", condition=Q(team__memberships__user=F("user")))
    return keys.annotate(membership=membership).annotate(
        **{f"member_{name}": F(f"membership__{name}") for name in ("id", "budget_per_day", "budget_per_month")})


# A running stream's limits are read again every few seconds (leases.py, LIMITS_REFRESH_SECONDS): with 1,000 streams
# the ORM's compilation of this query, joins and all, was a fifth of the process's CPU (docs/performance.md,
# "Session 14"). Compiled once per database thread, as the key look-up is.
_key_limits_row = PreparedQuery(lambda key_id: with_pool_columns(ApiKey.objects.filter(pk=key_id)).values_list(
    "id", *KEY_COLUMNS), -1)


def key_limits(limits: Limits, key: dict) -> Limits:
    """The user's `limits` for a request with the key whose KEY_COLUMNS (and id) are `key`: narrowed to the key's
    models, with the key's pools. A key that names a team its user is no longer in keeps no team pool here:
    authentication refuses it (keys.authenticate)."""
    pools = []
    if key["budget_per_day"] is not None or key["budget_per_month"] is not None:
        pools.append(Pool("key", key["id"], key["prefix"], limits.timezone,
                          budget_per_day=as_nanos(key["budget_per_day"]),
                          budget_per_month=as_nanos(key["budget_per_month"])))
    if key["team_id"] is not None and key["member_id"] is not None:
        team = {name: key[f"team__{name}"] for name in ("name", "timezone", "tokens_per_day", "tokens_per_month")}
        pools.append(Pool("team", key["team_id"], team["name"], team["timezone"], team["tokens_per_day"],
                          team["tokens_per_month"], as_nanos(key["team__budget_per_day"]),
                          as_nanos(key["team__budget_per_month"])))
        if key["member_budget_per_day"] is not None or key["member_budget_per_month"] is not None:
            pools.append(Pool("member", key["team_id"], team["name"], team["timezone"],
                              budget_per_day=as_nanos(key["member_budget_per_day"]),
                              budget_per_month=as_nanos(key["member_budget_per_month"])))
    return limits.narrowed_to(key["allowed_models"]).with_pools(pools)


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
    rows = _window_rows(user_id, window)
    # A settled row counts what it was charged (a provider may report more than the windows allowed: the ledger keeps
    # the report, the windows the charge).
    finished = rows.exclude(status=Usage.Status.STREAMING).aggregate(tokens=Sum(charged, default=0))
    # Requests still running hold their reservation. A row whose process has been silent for longer than a lease
    # lives holds nothing here: another process settles it and charges it then (ledger.claim_abandoned).
    alive_since = now_dt - timedelta(seconds=settings.QUOTA_SLOT_TTL)
    running = rows.filter(status=Usage.Status.STREAMING, heartbeat_at__gte=alive_since)
    leases = {request_id: amount or 0 for request_id, amount in running.values_list("request_id", reserved)}
    return finished["tokens"], leases


def _window_rows(user_id, window):
    """The ledger rows a window counts. The user's: by the row's day or month (in the user's zone at admission),
    except those an operator's reset took out (`counted`). A pool's (the key's, the team's, the member's cap): by the
    time the row started, within the window (a row starts at the instant its lease's windows were chosen)."""
    if window.owner == "user":
        rows = Usage.objects.filter(user_id=user_id, counted=True)
        return rows.filter(day=window.start.date()) if window.period == "day" else rows.filter(month=window.key)
    rows = Usage.objects.filter(started_at__gte=window.start, started_at__lt=window.end)
    if window.owner == "key":
        return rows.filter(api_key_id=window.owner_id)
    rows = rows.filter(team_id=window.owner_id)
    return rows if window.owner == "team" else rows.filter(user_id=user_id)
