"""Threshold alerts: a rule's threshold of a window's limit, crossed by a scope's usage, fires once; operators' alerts.

`check` runs at each lease's settlement (quotas/domain/leases.py) with what the lease already knows — the room left in
each window after its last lease — so it costs no counter-store round trip, and no database query unless a threshold
is crossed that this process has not seen fire: the rules are read at most once per RULES_REFRESH_SECONDS per process,
and the crossings already fired are remembered per process. A new crossing goes to a database thread, where one
`INSERT … ON CONFLICT DO NOTHING` per (rule, scope, window key, threshold) decides across every process and stream who
fired it (AlertEvent's unique constraint); only that inserter writes the deliveries to the outbox, in the same
transaction. The next window has a new key, so a rule is armed again at the window's reset. quotas/domain/outbox.py
sends the deliveries (`manage.py deliver_alerts`). docs/operations.md, "Alerts".

A scope is a string and a window a key ("tokens_day:2026-12-05", "money_month:2026-12"). Two scopes are alerted on:
a user's own windows ("user:42": its token limits and budgets, watched by its own, its plan's and everyone's rules)
and a team's pool ("team:7": watched by the team's rules, measured at any member's settlement). A key's spend limits
and a member's cap in a pool are not: no rule names them (another scope would plug in by building `Measure`s and
calling `evaluate`). Money windows are measured in nanos of SLUICE_CURRENCY, told in the currency.
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
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from ..models import ALERT_WINDOWS, AlertEvent, AlertRule, Outbox, UserQuota
from . import db
from .money import as_currency
from .policy import NO_BUDGET, window_limit
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
    windows: frozenset  # e.g. {"tokens_day", "money_month"}
    team_id: int | None = None  # a team rule's team: it watches that team's pool


class Rules:
    """The enabled rules as one process sees them, indexed by whom they watch."""

    def __init__(self, rules=()):
        self.by_user, self.by_team = {}, {}
        plan, everyone, operators = [], [], []
        for rule in rules:
            if rule.kind == AlertRule.Kind.USER:
                self.by_user.setdefault(rule.user_id, []).append(rule)
            elif rule.kind == AlertRule.Kind.TEAM:
                self.by_team.setdefault(rule.team_id, []).append(rule)
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

    def for_team(self, team_id):
        """A team's rules: they watch its pool, not its members' own windows (those are the members' rules')."""
        return self.by_team.get(team_id, ())


def _thresholds(value) -> tuple:
    if not isinstance(value, list):
        return ()
    return tuple(sorted({t for t in value if isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 100}))


def load_rules() -> Rules:
    """The enabled rules (one query). A malformed value saved past the admin's validation drops what it cannot read."""
    rows = AlertRule.objects.filter(enabled=True).values_list("id", "kind", "user_id", "plan_id", "thresholds",
                                                              "windows", "team_id")
    return Rules(CachedRule(id_, kind, user_id, plan_id, _thresholds(thresholds), _windows(windows), team_id)
                 for id_, kind, user_id, plan_id, thresholds, windows, team_id in rows)


def _windows(value) -> frozenset:
    return frozenset(w for w in value if w in ALERT_WINDOWS) if isinstance(value, list) else frozenset()


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

# A window's scope (policy.Window.scope) → the kind of measure a rule names (models.ALERT_WINDOWS).
MEASURE_KINDS = {"day": "tokens_day", "month": "tokens_month", "budget_day": "money_day",
                 "budget_month": "money_month"}


@dataclass(frozen=True)
class Measure:
    """One window of one scope, measured: `kind` is "<measure>_<period>" (tokens_day, money_month), `key` names the
    window. `unit` "tokens", or "money" (used and limit in nanos of SLUICE_CURRENCY)."""

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

    def amounts(self):
        """"850 of 1,000 tokens", "8.00 of 10.00 USD": for messages."""
        if self.unit == "money":
            return f"{_amount(self.used)} of {_amount(self.limit)} {settings.SLUICE_CURRENCY}"
        return f"{self.used:,} of {self.limit:,} {self.unit}"


@dataclass(frozen=True)
class TeamPool:
    """A team's pool as its alerts name it: the scope "team:<id>", and the team's name for messages."""

    id: int
    name: str

    @property
    def scope(self):
        return f"team:{self.id}"


@dataclass(frozen=True)
class Crossing:
    rule: CachedRule
    measure: Measure
    threshold: int

    def key(self, scope):
        return (self.rule.id, scope, self.measure.window_key, self.threshold)


def window_measures(limits, windows, remaining, returned=0, owner="user", owner_id=None):
    """One owner's windows as measures — the user's own (owner "user"), or a team's pool ("team" and the team's id)
    — from the room left in each after the lease's last grant (`remaining`, in each window's units: tokens, nanos for
    money, as the counter store answered) plus what the settlement gave back (`returned`, per window in its units:
    held but not charged; a number alone: the same in every window). Used = what the window counts: settled usage and
    what running streams hold.

    The limit is the window's under `limits` (policy.window_limit: the refreshed plan's, the pools'); a window whose
    limit was removed mid-stream (NO_BUDGET) has none to cross."""
    if isinstance(returned, int):
        returned = [returned] * len(windows)
    measures = []
    for window, left, back in zip(windows, remaining, returned):
        if window.owner != owner or window.owner_id != owner_id:
            continue
        limit = window_limit(window, limits)
        if limit <= 0 or limit == NO_BUDGET:
            continue
        used = limit - min(limit, max(0, left + back))
        measures.append(Measure(MEASURE_KINDS[window.scope], window.key, used, limit, window.end,
                                "money" if window.is_money else "tokens"))
    return measures


def team_pools(windows):
    """The team pools among a lease's windows, once each (a key names one team; its day and month, tokens and money
    windows are one pool)."""
    return list(dict.fromkeys(TeamPool(w.owner_id, w.owner_name) for w in windows if w.owner == "team"))


async def check(user_id, limits, windows, remaining, returned=0) -> int:
    """After a lease's settlement: fire the rules whose thresholds the windows crossed, and return how many fired.
    The user's, its plan's and everyone's rules watch the user's own windows (scope "user:<id>"); a team's rules its
    pool's windows (scope "team:<id>"), whichever member's settlement crossed them. A key's and a member's windows
    are not alerted on (no rule names them).

    `remaining` and `returned`: per window, in its units (window_measures). Never raises (an alert must not fail a
    settlement): a failure is logged, and the crossing is tried again at the next settlement of the scope.
    """
    if not remaining or limits.suspended:
        return 0
    try:
        rules = await current_rules()
    except Exception:
        logger.exception("could not read the alert rules")
        return 0
    fired = 0
    for scope, watching, owner, team in _watched(rules, user_id, windows):
        try:
            measures = window_measures(limits, windows, remaining, returned, owner, team.id if team else None)
            fired += await evaluate(scope, user_id, watching, measures, team)
        except Exception:
            logger.exception("could not check the alert thresholds of %s", scope)
    return fired


def _watched(rules, user_id, windows):
    """The scopes of a settlement that rules watch, as (scope, its rules, owner of its windows, TeamPool or None):
    only those are measured (the common case, no rule: no work)."""
    own = rules.for_user(user_id)
    if own:
        yield f"user:{user_id}", own, "user", None
    for team in team_pools(windows):
        watching = rules.for_team(team.id)
        if watching:
            yield team.scope, watching, "team", team


async def settled(lease, charged) -> int:
    """The hook in TokenLease.settle, once the store settled: `check` with what the lease knows (its windows, the room
    left in each at its last lease) and what it gave back in each: held but not charged. `charged`: what each window
    was charged, in its units (TokenLease.charges; a number alone: the same in every window)."""
    charged = [charged] * len(lease.held_units) if isinstance(charged, int) else charged
    returned = [held - spent for held, spent in zip(lease.held_units, charged)]
    return await check(lease.user_id, lease.limits, lease.windows, lease.remaining_units, returned)


def _plan_may_be(user_id, plan_id) -> bool:
    known = _state.plans.get(user_id)
    if known is None or time.monotonic() - known[1] > RULES_REFRESH_SECONDS:
        return True  # looked up when a crossing goes to the database
    return known[0] == plan_id


def _new_crossings(scope, user_id, rules, measures):
    """The thresholds `measures` crossed that this process has not seen fire (an O(1) look-up each)."""
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
    return crossings


async def evaluate(scope, user_id, rules, measures, team=None) -> int:
    """Fire `rules`' thresholds that `measures` crossed and this process has not seen fire; returns how many fired
    here (inserted their event). The database work runs on a database thread, and only for new crossings. `team`: the
    TeamPool whose windows `measures` are (scope "team:<id>"); `user_id` is then the member whose settlement crossed
    them."""
    crossings = _new_crossings(scope, user_id, rules, measures)
    if not crossings:
        return 0
    keys = [c.key(scope) for c in crossings]
    _remember(keys)  # in flight: this process's other streams need not try them too
    try:
        outcome = await db.run(fire, scope, user_id, crossings, team=team)
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


def fire(scope, user_id, crossings, now=None, team=None) -> Fired:
    """Insert each crossing's event unless it exists (any process may have fired it: the unique constraint decides),
    and the deliveries of those inserted here, in one transaction. Sync (a database thread). `team`: see `evaluate`.

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
    who = f"team '{team.name}'" if team else user
    inserted = []
    with transaction.atomic():
        for crossing in sorted(wanted, key=lambda c: (c.rule.id, c.measure.window_key, c.threshold)):
            rule = rules.get(crossing.rule.id)
            if rule is None or not rule.enabled:  # deleted or disabled since this process read the rules
                continue
            m = crossing.measure
            text = threshold_text(who, crossing)
            event_id = insert_event(rule.pk, scope, m.window_key, crossing.threshold, now, m.used, m.limit, text)
            if event_id is not None:
                inserted.append((rule, crossing, event_id, text))
        rows = []
        for rule, crossing, event_id, text in _highest(inserted):
            payload = threshold_payload(rule, crossing, event_id, scope, (user_id, user), team, now, text)
            subject = f"[Sluice] {who}: {crossing.threshold} % of the {_window_name(crossing.measure)}"
            rows += deliveries(rule, event_id, payload, subject, text, now)
        Outbox.objects.bulk_create(rows)
    for rule, crossing, _, text in inserted:
        logger.info("alert %s fired: %s", rule.name, text)
    return Fired(len(inserted), plan_id, not_applicable)


def _highest(inserted):
    """Of the events inserted, the highest threshold's of each rule's window: the one delivered."""
    highest = {}
    for item in inserted:
        rule, crossing = item[0], item[1]
        slot = (rule.pk, crossing.measure.window_key)
        if slot not in highest or crossing.threshold > highest[slot][1].threshold:
            highest[slot] = item
    return highest.values()


def threshold_payload(rule, crossing, event_id, scope, user, team, now, text):
    """A threshold's webhook body. `user`: (id, username), whose settlement crossed it; a team's pool adds "team", a
    money window "currency" (used and limit are in nanos of it)."""
    m = crossing.measure
    payload = {
        "type": "quota.threshold", "event_id": event_id, "rule": {"id": rule.pk, "name": rule.name},
        "scope": scope, "user": {"id": user[0], "username": user[1]},
        "window": {"kind": m.kind, "key": m.key, "id": m.window_key,
                   "resets_at": m.resets_at.isoformat() if m.resets_at else None},
        "threshold": crossing.threshold, "used": m.used, "limit": m.limit, "unit": m.unit,
        "percent": round(m.percent, 1), "fired_at": now.isoformat(), "text": text,
    }
    if team:
        payload["team"] = {"id": team.id, "name": team.name}
    if m.unit == "money":
        payload["currency"] = settings.SLUICE_CURRENCY
    return payload


def _window_name(measure):
    """"daily token limit", "monthly budget"."""
    what, _, period = measure.kind.partition("_")
    return f"{PERIODS.get(period, period)} {'token limit' if what == 'tokens' else 'budget'}"


def _amount(nanos):
    """An amount in the currency as people read it: two decimals (rounded down: never more than was used), except an
    amount under 1 that is not whole cents, in full (0.0042): a small budget is not told as 0.00 of 0.00."""
    value = as_currency(nanos)
    cents = value.quantize(Decimal("0.01"), rounding=ROUND_DOWN)
    return f"{cents:,.2f}" if cents == value or value >= 1 else f"{value.normalize():f}"


def threshold_text(who, crossing):
    m = crossing.measure
    resets = f"; the window resets at {m.resets_at:%Y-%m-%d %H:%M %Z}" if m.resets_at else ""
    return (f"{who} has used {m.percent:.0f} % of the {_window_name(m)} ({m.amounts()}, window {m.key}), past the "
            f"{crossing.threshold} % threshold{resets}.")


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
