"""Threshold alerts: a rule's threshold of a window's limit, crossed by a scope's usage, fires once; operators' alerts.

`check` runs at each lease's settlement (quotas/domain/leases.py) with what the lease already knows — the room left in
each window after its last lease — so it costs no counter-store round trip, and no database query unless a threshold
is crossed that this process has not seen fire: the rules are read at most once per RULES_REFRESH_SECONDS per process,
and the crossings already fired are remembered per process. A new crossing goes to a database thread, where one
`INSERT … ON CONFLICT DO NOTHING` per (rule, scope, window key, threshold) decides across every process and stream who
fired it (AlertEvent's unique constraint); only that inserter writes the deliveries to the outbox, in the same
transaction. The next window has a new key, so a rule is armed again at the window's reset. quotas/domain/outbox.py
sends the deliveries (`manage.py deliver_alerts`). docs/operations.md, "Alerts".

A scope is a string ("user:42"; later "team:7", "key:9") and a window a key ("tokens_day:2026-12-05"): money windows
and other scopes plug in by building `Measure`s and calling `evaluate`.
"""

import asyncio
import functools
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from ..models import ALERT_WINDOWS, AlertEvent, AlertRule, Outbox, UserQuota
from . import db
from .selectors import default_plan

logger = logging.getLogger("quotas.alerts")

# A process re-reads the enabled rules at most this often: a new or edited rule applies within this time.
RULES_REFRESH_SECONDS = 5.0
# An operator alert of one kind (and subject) fires at most once per this many seconds: a 10-minute time bucket is
# its window key.
OPERATOR_ALERT_SECONDS = 600
# The per-process memory of crossings already fired is dropped past this many entries (the unique constraint still
# holds: forgetting costs one INSERT that does nothing).
MEMORY_MAX = 100_000

PERIODS = {"day": "daily", "month": "monthly"}
HOSTNAME = socket.gethostname()  # named in operators' alerts


@dataclass(frozen=True)
class CachedRule:
    id: int
    kind: str
    user_id: int | None
    plan_id: int | None
    thresholds: tuple  # ascending percentages
    windows: frozenset  # e.g. {"tokens_day", "tokens_month"}


class Rules:
    """The enabled rules as one process sees them, indexed by whom they watch."""

    def __init__(self, rules=()):
        self.by_user = {}
        plan, everyone, operators = [], [], []
        for rule in rules:
            if rule.kind == AlertRule.Kind.USER:
                self.by_user.setdefault(rule.user_id, []).append(rule)
            elif rule.kind == AlertRule.Kind.PLAN:
                plan.append(rule)
            elif rule.kind == AlertRule.Kind.EVERYONE:
                everyone.append(rule)
            elif rule.kind == AlertRule.Kind.OPERATORS:
                operators.append(rule)
        self.general = tuple(plan + everyone)  # may apply to any user
        self.operators = tuple(operators)

    def for_user(self, user_id):
        own = self.by_user.get(user_id)
        return (*own, *self.general) if own else self.general


def _thresholds(value) -> tuple:
    if not isinstance(value, list):
        return ()
    return tuple(sorted({t for t in value if isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 100}))


def load_rules() -> Rules:
    """The enabled rules (one query). A malformed value saved past the admin's validation drops what it cannot read."""
    rows = AlertRule.objects.filter(enabled=True).values_list("id", "kind", "user_id", "plan_id", "thresholds",
                                                              "windows")
    return Rules(CachedRule(id_, kind, user_id, plan_id, _thresholds(thresholds),
                            frozenset(w for w in windows if w in ALERT_WINDOWS) if isinstance(windows, list)
                            else frozenset())
                 for id_, kind, user_id, plan_id, thresholds, windows in rows)


class _State:
    """This process's cache of the rules, its memory of what fired, and the users' plans it looked up."""

    def __init__(self):
        self.rules = None
        self.read_at = -math.inf  # monotonic
        self.refreshing = False
        self.fired = {}  # (rule id, scope, window key, threshold) or an operator alert's key -> None
        self.plans = {}  # user id -> (plan id, monotonic read time)
        self.lock = threading.Lock()
        self.tasks = set()  # operator alerts being written (a reference keeps each task alive)


_state = _State()


def reset():
    """Forget the cached rules and what fired (tests; a rule written in this process applies at once after it)."""
    global _state
    _state = _State()


def _rules_sync() -> Rules:
    """The cached rules, read again if stale (sync: a database thread). Concurrent callers wait for one query."""
    state = _state
    with state.lock:
        if state.rules is not None and time.monotonic() - state.read_at < RULES_REFRESH_SECONDS:
            return state.rules
        try:
            state.rules = load_rules()
        except Exception:
            # The database is down: keep what was read (nothing at first) and try again after the refresh interval,
            # not at every settlement.
            logger.warning("could not read the alert rules", exc_info=True)
            if state.rules is None:
                state.rules = Rules()
        state.read_at = time.monotonic()
        return state.rules


async def current_rules() -> Rules:
    state = _state
    rules = state.rules
    if rules is not None and (time.monotonic() - state.read_at < RULES_REFRESH_SECONDS or state.refreshing):
        return rules  # fresh, or stale while another caller reads them again
    state.refreshing = True
    try:
        return await db.run(_rules_sync)
    finally:
        state.refreshing = False


def _remember(keys):
    fired = _state.fired
    if len(fired) + len(keys) > MEMORY_MAX:
        fired.clear()
    for key in keys:
        fired[key] = None


def _forget(keys):
    for key in keys:
        _state.fired.pop(key, None)


# Threshold alerts --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """One window of one scope, measured: `kind` is "<measure>_<period>" (tokens_day), `key` names the window."""

    kind: str
    key: str
    used: int
    limit: int
    resets_at: datetime | None = None
    unit: str = "tokens"

    @property
    def window_key(self):
        return f"{self.kind}:{self.key}"

    @property
    def percent(self):
        return 100 * self.used / self.limit


@dataclass(frozen=True)
class Crossing:
    rule: CachedRule
    measure: Measure
    threshold: int

    def key(self, scope):
        return (self.rule.id, scope, self.measure.window_key, self.threshold)


def token_measures(limits, windows, remaining_by_window, returned=0):
    """The user's token windows (policy.calendar_windows) as measures, from the room left after the last lease
    (`remaining_by_window`, what the counter store answered) plus what the settlement gave back (`returned`: the
    lease's tokens not charged). Used = what the window counts: settled tokens and what running streams hold."""
    limit_of = {"day": limits.tokens_per_day, "month": limits.tokens_per_month}
    measures = []
    for window, remaining in zip(windows, remaining_by_window):
        if window.scope not in limit_of:
            continue  # a money window (budget_day, budget_month): in nanos, not tokens
        limit = limit_of[window.scope]
        if not limit:
            continue
        left = min(limit, max(0, remaining + returned))
        measures.append(Measure(f"tokens_{window.scope}", window.key, limit - left, limit, window.end))
    return measures


async def check(user_id, limits, windows, remaining_by_window, returned=0) -> int:
    """After a lease's settlement: fire the user's rules whose thresholds the windows crossed; returns how many fired.

    Never raises (an alert must not fail a settlement): a failure is logged, and the crossing is tried again at the
    user's next settlement.
    """
    if not remaining_by_window or limits.suspended:
        return 0
    try:
        rules = (await current_rules()).for_user(user_id)
        if not rules:
            return 0
        return await evaluate(f"user:{user_id}", user_id, rules,
                              token_measures(limits, windows, remaining_by_window, returned))
    except Exception:
        logger.exception("could not check the alert thresholds of user %s", user_id)
        return 0


async def settled(lease, charged) -> int:
    """The hook in TokenLease.settle, once the store settled: `check` with what the lease knows (its windows, the room
    left at its last lease) and the tokens it gave back (held but not charged)."""
    return await check(lease.user_id, lease.limits, lease.windows, lease.remaining_by_window, lease.held - charged)


def _plan_may_be(user_id, plan_id) -> bool:
    known = _state.plans.get(user_id)
    if known is None or time.monotonic() - known[1] > RULES_REFRESH_SECONDS:
        return True  # looked up when a crossing goes to the database
    return known[0] == plan_id


async def evaluate(scope, user_id, rules, measures) -> int:
    """Fire `rules`' thresholds that `measures` crossed and this process has not seen fire; returns how many fired
    here (inserted their event). The database work runs on a database thread, and only for new crossings."""
    crossings = []
    fired = _state.fired
    for rule in rules:
        if rule.plan_id is not None and not _plan_may_be(user_id, rule.plan_id):
            continue
        for measure in measures:
            if measure.kind not in rule.windows or measure.limit <= 0:
                continue
            for threshold in rule.thresholds:
                if measure.used * 100 < threshold * measure.limit:
                    break  # ascending
                crossing = Crossing(rule, measure, threshold)
                if crossing.key(scope) not in fired:
                    crossings.append(crossing)
    if not crossings:
        return 0
    keys = [c.key(scope) for c in crossings]
    _remember(keys)  # in flight: this process's other streams need not try them too
    try:
        outcome = await db.run(fire, scope, user_id, crossings)
    except BaseException:
        _forget(keys)  # tried again at the next settlement
        raise
    if outcome.plan_id is not None:
        if len(_state.plans) >= MEMORY_MAX:
            _state.plans.clear()
        _state.plans[user_id] = (outcome.plan_id, time.monotonic())
    _forget(outcome.not_applicable)
    return outcome.fired


@dataclass(frozen=True)
class Fired:
    fired: int  # events inserted
    plan_id: int | None  # the user's plan, if it was looked up
    not_applicable: tuple = ()  # memory keys of plan rules that are not the user's plan's


def plan_of(user_id):
    plan_id = UserQuota.objects.filter(user_id=user_id).values_list("plan_id", flat=True).first()
    return plan_id if plan_id is not None else default_plan().pk


def fire(scope, user_id, crossings, now=None) -> Fired:
    """Insert each crossing's event unless it exists (any process may have fired it: the unique constraint decides),
    and the deliveries of those inserted here, in one transaction. Sync (a database thread).

    Crossings are inserted in one order (rule, window, threshold) so that two transactions never wait for each other
    in a cycle. When one settlement crosses several thresholds of a rule's window at once (50 % and 80 %), each gets
    its event but only the highest is delivered: one message, not a burst.
    """
    now = now or timezone.now()
    plan_id = plan_of(user_id) if any(c.rule.plan_id is not None for c in crossings) else None
    wanted = [c for c in crossings if c.rule.plan_id is None or c.rule.plan_id == plan_id]
    not_applicable = tuple(c.key(scope) for c in crossings if c.rule.plan_id is not None and c.rule.plan_id != plan_id)
    if not wanted:
        return Fired(0, plan_id, not_applicable)
    rules = AlertRule.objects.in_bulk({c.rule.id for c in wanted})
    user = get_user_model().objects.filter(pk=user_id).values_list("username", flat=True).first() or f"user {user_id}"
    inserted = []
    with transaction.atomic():
        for crossing in sorted(wanted, key=lambda c: (c.rule.id, c.measure.window_key, c.threshold)):
            rule = rules.get(crossing.rule.id)
            if rule is None or not rule.enabled:  # deleted or disabled since this process read the rules
                continue
            m = crossing.measure
            text = threshold_text(user, crossing)
            event_id = insert_event(rule.pk, scope, m.window_key, crossing.threshold, now, m.used, m.limit, text)
            if event_id is not None:
                inserted.append((rule, crossing, event_id, text))
        highest = {}
        for item in inserted:
            rule, crossing = item[0], item[1]
            slot = (rule.pk, crossing.measure.window_key)
            if slot not in highest or crossing.threshold > highest[slot][1].threshold:
                highest[slot] = item
        rows = []
        for rule, crossing, event_id, text in highest.values():
            m = crossing.measure
            payload = {
                "type": "quota.threshold", "event_id": event_id, "rule": {"id": rule.pk, "name": rule.name},
                "scope": scope, "user": {"id": user_id, "username": user},
                "window": {"kind": m.kind, "key": m.key, "id": m.window_key,
                           "resets_at": m.resets_at.isoformat() if m.resets_at else None},
                "threshold": crossing.threshold, "used": m.used, "limit": m.limit, "unit": m.unit,
                "percent": round(m.percent, 1), "fired_at": now.isoformat(), "text": text,
            }
            subject = f"[Sluice] {user}: {crossing.threshold} % of the {_window_name(m)} limit"
            rows += deliveries(rule, event_id, payload, subject, text, now)
        Outbox.objects.bulk_create(rows)
    for rule, crossing, _, text in inserted:
        logger.info("alert %s fired: %s", rule.name, text)
    return Fired(len(inserted), plan_id, not_applicable)


def _window_name(measure):
    what, _, period = measure.kind.partition("_")
    return f"{PERIODS.get(period, period)} {'token' if what == 'tokens' else what}"


def threshold_text(who, crossing):
    m = crossing.measure
    resets = f"; the window resets at {m.resets_at:%Y-%m-%d %H:%M %Z}" if m.resets_at else ""
    return (f"{who} has used {m.percent:.0f} % of the {_window_name(m)} limit ({m.used:,} of {m.limit:,} {m.unit}, "
            f"window {m.key}), past the {crossing.threshold} % threshold{resets}.")


@functools.cache
def _insert_sql(vendor):
    """INSERT … ON CONFLICT DO NOTHING RETURNING id (PostgreSQL, SQLite ≥ 3.35): the id only for the inserter."""
    meta = AlertEvent._meta
    quote = connection.ops.quote_name
    column = {f.name: quote(f.column) for f in meta.concrete_fields}
    names = ["rule", "scope", "window_key", "threshold", "fired_at", "used", "limit", "message"]
    unique = ["rule", "scope", "window_key", "threshold"]
    return (f"INSERT INTO {quote(meta.db_table)} ({', '.join(column[n] for n in names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))}) "
            f"ON CONFLICT ({', '.join(column[n] for n in unique)}) DO NOTHING RETURNING {column['id']}")


def insert_event(rule_id, scope, window_key, threshold, now, used=None, limit=None, message=""):
    """The event's id if this call inserted it; None if it existed (fired already, here or by another process)."""
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(connection.vendor),
                       (rule_id, scope[:200], window_key[:100], threshold,
                        connection.ops.adapt_datetimefield_value(now), used, limit, message))
        row = cursor.fetchone()
    return row[0] if row else None


def deliveries(rule, event_id, payload, subject, text, now):
    """The rule's outbox rows for one event: an e-mail per address, and its webhook."""
    rows = [Outbox(event_id=event_id, channel=Outbox.Channel.EMAIL, target=address, created_at=now,
                   next_attempt_at=now, payload={"subject": subject, "body": f"{text}\n\nAlert rule: {rule.name}\n"})
            for address in rule.emails or ()]
    if rule.webhook_url:
        if rule.webhook_format == AlertRule.WebhookFormat.SLACK:
            rows.append(Outbox(event_id=event_id, channel=Outbox.Channel.SLACK, target=rule.webhook_url,
                               payload={"text": f"{subject}\n{text}"}, created_at=now, next_attempt_at=now))
        else:
            rows.append(Outbox(event_id=event_id, channel=Outbox.Channel.WEBHOOK, target=rule.webhook_url,
                               payload=payload, created_at=now, next_attempt_at=now))
    return rows


# Operators' alerts -------------------------------------------------------------------------------------------------

def _bucket(now) -> int:
    return int(now.timestamp() // OPERATOR_ALERT_SECONDS) * OPERATOR_ALERT_SECONDS


def _operator_window(kind, subject, now):
    bucket = _bucket(now)
    scope = f"operator:{kind}" + (f":{subject}" if subject else "")
    return scope[:200], f"{kind}:{datetime.fromtimestamp(bucket, UTC):%Y-%m-%dT%H:%MZ}"


def fire_operator(kind, message, subject="", now=None) -> int:
    """Write an operator alert for every enabled operators' rule, once per kind (and subject) per 10-minute bucket
    across every process (the events' unique constraint); returns how many events were inserted. Sync."""
    now = now or timezone.now()
    scope, window_key = _operator_window(kind, subject, now)
    rules = _rules_sync().operators
    if not rules:
        logger.error("operator alert, with no operators' alert rule to send it to: %s", message)
        return 0
    inserted = 0
    with transaction.atomic():
        for rule in AlertRule.objects.filter(pk__in=sorted(r.id for r in rules), enabled=True).order_by("pk"):
            event_id = insert_event(rule.pk, scope, window_key, 0, now, message=message)
            if event_id is None:
                continue
            inserted += 1
            payload = {"type": f"operator.{kind}", "event_id": event_id, "rule": {"id": rule.pk, "name": rule.name},
                       "scope": scope, "kind": kind, "subject": subject, "window": {"id": window_key},
                       "fired_at": now.isoformat(), "text": message}
            subject_line = f"[Sluice] {kind.replace('_', ' ')}" + (f": {subject}" if subject else "")
            Outbox.objects.bulk_create(deliveries(rule, event_id, payload, subject_line, message, now))
    if inserted:
        logger.error("operator alert: %s", message)
    return inserted


def _claim_operator(kind, subject, now):
    """True if this process has not alerted of it in the current bucket (and now has): O(1), for the hot path."""
    key = ("operator", kind, subject, _bucket(now))
    if key in _state.fired:
        return False
    _remember([key])
    return True


async def operator_alert(kind, message, subject="", now=None) -> int:
    """An operators' alert (`kind`: "counter_store_down", "breaker_open", …), at most once per kind and subject per
    10 minutes across processes; returns how many events this call inserted. Never raises."""
    now = now or timezone.now()
    if not _claim_operator(kind, subject, now):
        return 0
    try:
        return await db.run(fire_operator, kind, message, subject, now)
    except Exception:
        # Not retried within the bucket (an outage must not query per request); the log has it.
        logger.exception("could not write the operator alert: %s", message)
        return 0


def notify_operator(kind, message, subject=""):
    """`operator_alert` without waiting: from code that must not wait for the database (a request the counter store
    failed). Costs a dictionary look-up when this process alerted of it in the last 10 minutes."""
    now = timezone.now()
    if not _claim_operator(kind, subject, now):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # sync code: write it now
        try:
            fire_operator(kind, message, subject, now)
        except Exception:
            logger.exception("could not write the operator alert: %s", message)
        return

    async def write():
        try:
            await db.run(fire_operator, kind, message, subject, now)
        except Exception:
            logger.exception("could not write the operator alert: %s", message)

    task = loop.create_task(write())
    _state.tasks.add(task)
    task.add_done_callback(_state.tasks.discard)


def counter_store_down():
    """The hook where a request finds the counter store down (quotas/domain/leases.py)."""
    notify_operator("counter_store_down",
                    f"The counter store is unreachable from {HOSTNAME}: token quotas fail closed "
                    "(requests are answered 503) until it is back.")


def breaker_opened(deployment: str):
    """The hook for the streaming side when a deployment's circuit breaker opens (quotas cannot import streaming)."""
    notify_operator("breaker_open",
                    f"The circuit breaker of deployment {deployment} opened: its requests go to other deployments, "
                    "or are answered 503, until it recovers.", subject=deployment)
