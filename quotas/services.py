"""Quota services: the only writers of quota state (counter store and ledger).

The middleware calls `hit_rate` and `acquire_slot`; the stream holds a `TokenLease` from
admission to settlement. docs/quotas.md explains the arithmetic.
"""

import asyncio
import functools
import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from . import exceptions
from .db import database
from .models import DailyUsage, Plan, Usage, UserQuota
from .policy import Limits, calendar_windows, clamp_max_tokens, first_lease
from .store import StoreUnavailable, WindowSpec, get_store

logger = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 60.0
# A window's record outlives the window by a day, so a late settlement still finds it.
WINDOW_MARGIN_SECONDS = 86_400
# A lease re-reads the user's limits at most this often, so an operator's change reaches
# running streams at their next lease without a query per lease.
LIMITS_REFRESH_SECONDS = 5.0


def user_key(user_id, suffix):
    # The hash tag {u<id>} keeps one user's keys in one Redis Cluster slot (multi-key scripts).
    return f"sluice:{{u{user_id}}}:{suffix}"


def window_key(user_id, window):
    return user_key(user_id, f"{window.scope[0]}:{window.key}")


def default_plan():
    plan = Plan.objects.filter(is_default=True).first()
    if plan is None:
        plan = Plan.objects.get_or_create(name="default", defaults={"is_default": True})[0]
    return plan


def limits_of(quota) -> Limits:
    """The limits of a user with this UserQuota (its plan fetched with it), or of one without (None)."""
    if quota is not None:
        return Limits.combine(quota.plan, quota)
    return Limits.combine(default_plan())


@database
def _user_limits(user_id) -> Limits:
    return limits_of(UserQuota.objects.select_related("plan").filter(user_id=user_id).first())


async def effective_limits(user_id) -> Limits:
    """The user's plan with per-user overrides; users without a record get the default plan."""
    return await _user_limits(user_id)


async def hit_rate(user_id, limits: Limits, now: float):
    """Count a request against the per-minute limit; raise the refusal if it is over."""
    try:
        result = await get_store().hit(user_key(user_id, "rpm"), limits.requests_per_minute,
                                       RATE_WINDOW_SECONDS, now)
    except StoreUnavailable:
        logger.warning("counter store unavailable for the request rate (fail %s)",
                       "open" if settings.QUOTA_RATE_FAIL_OPEN else "closed")
        if settings.QUOTA_RATE_FAIL_OPEN:
            return None
        raise exceptions.store_unavailable("rate limit")
    if not result.allowed:
        raise exceptions.rate_limited(result.reset_seconds, limits.requests_per_minute)
    return result


async def peek_rate(user_id, limits: Limits):
    """The request window as it stands, or None if the store cannot say (headers only)."""
    try:
        return await get_store().peek_rate(user_key(user_id, "rpm"), limits.requests_per_minute,
                                           RATE_WINDOW_SECONDS, time.time())
    except StoreUnavailable:
        return None


async def acquire_slot(user_id, limits: Limits, holder: str, now: float) -> str | None:
    """Take a concurrent-stream slot; returns its key (None when failing open)."""
    key = user_key(user_id, "slots")
    try:
        result = await get_store().acquire_slot(key, holder, limits.concurrent_streams,
                                                settings.QUOTA_SLOT_TTL, now)
    except StoreUnavailable:
        if settings.QUOTA_CONCURRENCY_FAIL_OPEN:
            return None
        raise exceptions.store_unavailable("concurrency limit")
    if not result.acquired:
        raise exceptions.concurrency_limited(limits.concurrent_streams)
    return key


async def release_slot(key: str | None, holder: str):
    if key is None:
        return
    try:
        await get_store().release_slot(key, holder)
    except StoreUnavailable:
        # The slot's TTL frees it anyway.
        logger.warning("could not release a concurrency slot; it expires within QUOTA_SLOT_TTL")


def window_specs(user_id, limits: Limits, now_dt):
    windows = calendar_windows(limits, now_dt)
    specs = [WindowSpec(window_key(user_id, w), w.limit, w.end.timestamp() + WINDOW_MARGIN_SECONDS)
             for w in windows]
    return windows, specs


@database
def _ledger_state(user_id, window, now_dt):
    """(used, {request_id: reserved}) of one window, from the ledger: what a missing record holds."""
    rows = Usage.objects.filter(user_id=user_id, counted=True)
    rows = rows.filter(day=window.start.date()) if window.scope == "day" else rows.filter(month=window.key)
    finished = rows.exclude(status=Usage.Status.STREAMING).aggregate(p=Sum("prompt_tokens"), c=Sum("completion_tokens"))
    # Requests still streaming hold at most their reservation; rows older than the longest
    # possible stream belong to a crashed worker and hold nothing.
    alive_since = now_dt - timedelta(seconds=settings.STREAM_MAX_DURATION + settings.QUOTA_SLOT_TTL)
    running = rows.filter(status=Usage.Status.STREAMING, started_at__gte=alive_since)
    leases = dict(running.values_list("request_id", "reserved_tokens"))
    return (finished["p"] or 0) + (finished["c"] or 0), leases


async def seed_windows(user_id, windows, specs, missing, now):
    now_dt = timezone.now()
    for window, spec in zip(windows, specs):
        if spec.key in missing:
            used, leases = await _ledger_state(user_id, window, now_dt)
            logger.info("rebuilt quota window %s from the ledger: %d used, %d running", spec.key, used, len(leases))
            await get_store().seed(spec, used, leases, now, settings.QUOTA_SLOT_TTL)


class TokenLease:
    """A request's hold on its user's token windows, from admission to settlement.

    Every token the client receives is covered by the lease first, so the windows' limits hold
    mid-stream across concurrent streams and processes; `settle` turns the lease into the tokens
    actually charged and returns the rest.
    """

    def __init__(self, user_id, limits, holder, now_dt):
        self.user_id = user_id
        self.limits = limits
        self.holder = holder
        self.windows, self.specs = window_specs(user_id, limits, now_dt)
        self.held = 0  # tokens leased so far: prompt + completion
        self.prompt_tokens = 0
        self.max_tokens = 0
        self.limits_read_at = time.monotonic()
        self.settled = False
        self.remaining = None  # in the tightest window, after the last lease
        self.block = settings.QUOTA_LEASE_BLOCK_TOKENS

    @property
    def completion_leased(self):
        return self.held - self.prompt_tokens

    async def _lease(self, want):
        store = get_store()
        now = time.time()
        try:
            for _ in range(3):
                result = await store.lease(self.specs, self.holder, self.held, want, now, settings.QUOTA_SLOT_TTL)
                if not result.missing:
                    self.held += result.granted
                    self.remaining = min(result.remaining) if result.remaining else 0
                    return result.granted
                await seed_windows(self.user_id, self.windows, self.specs, result.missing, now)
        except StoreUnavailable:
            logger.warning("counter store unavailable: token quota fails closed")
            raise exceptions.store_unavailable("quota")
        raise exceptions.store_unavailable("quota")

    def exhausted_error(self):
        now = timezone.now()
        # The window that ran out: the one with the least left, the day before the month.
        window = self.windows[0]
        return exceptions.insufficient_quota(window.scope, window.seconds_left(now), window.end)

    async def admit(self, prompt_tokens, requested_max, stream: bool):
        """Reserve the prompt and the first block; clamp max_tokens. Raises insufficient_quota."""
        self.prompt_tokens = prompt_tokens
        plan_max = self.limits.max_tokens_per_request
        wanted_completion = min(requested_max or plan_max, plan_max)
        block = settings.QUOTA_LEASE_BLOCK_TOKENS if stream else wanted_completion
        granted = await self._lease(first_lease(prompt_tokens, wanted_completion, block))
        if granted <= prompt_tokens:
            await self.release()
            raise self._which_exhausted(await self.status())
        # What the completion may use: its first block plus whatever is left in every window.
        available = granted - prompt_tokens + (self.remaining if stream else 0)
        self.max_tokens = clamp_max_tokens(requested_max, plan_max, available)
        return self.max_tokens

    def _which_exhausted(self, status):
        now = timezone.now()
        for window in self.windows:
            if status.get(window.scope, {}).get("remaining", 1) <= 0:
                return exceptions.insufficient_quota(window.scope, window.seconds_left(now), window.end)
        return self.exhausted_error()

    async def need(self, tokens) -> bool:
        """Make sure `tokens` more completion tokens are covered; False when the quota is spent."""
        if time.monotonic() - self.limits_read_at > LIMITS_REFRESH_SECONDS:
            await self._refresh_limits()
        # A block at a time, doubling as the stream proves long (one store round trip per block),
        # never more than the stream may still use: a long stream makes few round trips, and a
        # short one holds little that other streams of the user cannot have.
        self.block = min(self.block * 2, settings.QUOTA_LEASE_MAX_BLOCK_TOKENS)
        want = max(tokens, min(self.block, self.max_tokens - self.completion_leased))
        granted = await self._lease(want)
        if granted >= tokens:
            return True
        return False

    async def _refresh_limits(self):
        self.limits_read_at = time.monotonic()
        limits = await effective_limits(self.user_id)
        if limits != self.limits:
            self.limits = limits
            # Same windows (keys), new limits; a suspension stops the stream at its next lease.
            self.specs = [WindowSpec(s.key, w_limit, s.expire_at) for s, w_limit in
                          zip(self.specs, (0, 0) if limits.suspended else (limits.tokens_per_day, limits.tokens_per_month))]

    async def renew(self, slot_key):
        try:
            await get_store().renew(self.specs, slot_key, self.holder, time.time(), settings.QUOTA_SLOT_TTL)
        except StoreUnavailable:
            logger.warning("could not renew a lease; it expires within QUOTA_SLOT_TTL")

    async def release(self):
        await self.settle(0)

    async def settle(self, charged):
        """Charge `charged` tokens and return the rest of the lease. Idempotent."""
        if self.settled:
            return
        self.settled = True
        for attempt in range(3):
            try:
                await get_store().settle(self.specs, self.holder, charged)
                return
            except StoreUnavailable:
                await asyncio.sleep(0.05 * (attempt + 1))
        logger.error("could not settle %s in the counter store; the ledger row is correct", self.holder)

    async def status(self):
        """Per window: limit, used (settled + leased), remaining, reset time."""
        store, now = get_store(), time.time()
        out = {}
        for window, spec in zip(self.windows, self.specs):
            state = await store.usage(spec.key, now)
            if state is None:
                await seed_windows(self.user_id, [window], [spec], {spec.key}, now)
                state = await store.usage(spec.key, now) or (0, 0)
            used = state[0] + state[1]
            out[window.scope] = {
                "limit": spec.limit, "used": used, "remaining": max(0, spec.limit - used),
                "resets_at": window.end.isoformat(), "reset_seconds": window.seconds_left(timezone.now()),
            }
        return out


async def quota_status(user_id, limits: Limits):
    """Limits, usage, remaining and reset times of the user's token windows."""
    try:
        return await TokenLease(user_id, limits, holder="", now_dt=timezone.now()).status()
    except StoreUnavailable:
        raise exceptions.store_unavailable("quota")


# The ledger ------------------------------------------------------------------------------------


def ledger_row(*, request_id, user_id, api_key_id, model, stream, reserved_tokens, windows) -> Usage:
    """A request's ledger row, not yet saved (`open_ledger` inserts it, or `close_ledger` with its ending)."""
    day, month = windows
    return Usage(
        request_id=request_id, user_id=user_id, api_key_id=api_key_id, model=model, stream=stream,
        reserved_tokens=reserved_tokens, day=day.start.date(), month=month.key,
    )


@database
def open_ledger(row: Usage):
    """Insert the row of a running request (status `streaming`, holding its reservation)."""
    row.save(force_insert=True)
    return row


@database
def close_ledger(row: Usage, **fields):
    """Settle the request's one row (inserting it if it was never opened) and its daily rollup, in one
    transaction."""
    fields.setdefault("ended_at", timezone.now())
    fields["reserved_tokens"] = 0
    for name, value in fields.items():
        setattr(row, name, value)
    if row.started_at and row.ended_at:
        row.duration_ms = int((row.ended_at - row.started_at).total_seconds() * 1000)
    with transaction.atomic():
        row.save()
        _roll_up(row)
    return row


@database
def record_refusal(*, request_id, user_id, api_key_id, model, code, limits):
    """A refused request gets its ledger row too (status `rejected`), for the operator's view."""
    now = timezone.now()
    day, month = calendar_windows(limits, now)
    row = Usage.objects.create(
        request_id=request_id, user_id=user_id, api_key_id=api_key_id, model=model or "",
        status=Usage.Status.REJECTED, reason=code, started_at=now, ended_at=now, duration_ms=0,
        day=day.start.date(), month=month.key,
    )
    _roll_up(row)
    return row


_ROLL_UP_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "refusals", "upstream_errors")


@functools.cache
def _roll_up_sql():
    """One INSERT … ON CONFLICT DO UPDATE (PostgreSQL and SQLite ≥ 3.24): the day's row gains the request.

    A single statement where the ORM needs an UPDATE, and an INSERT plus a second UPDATE on a user's first
    request of the day; it is on every request's settlement (docs/performance.md).
    """
    meta = DailyUsage._meta
    table = connection.ops.quote_name(meta.db_table)
    column = {f.name: connection.ops.quote_name(f.column) for f in meta.concrete_fields}
    keys = [column["user"], column["model"], column["date"]]
    counters = [column[name] for name in _ROLL_UP_COUNTERS]
    return (f"INSERT INTO {table} ({', '.join(keys + counters)}) VALUES ({', '.join(['%s'] * (len(keys) + len(counters)))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counters))


def _roll_up(row):
    values = (row.user_id, row.model, connection.ops.adapt_datefield_value(row.started_at.date()), 1, row.prompt_tokens, row.completion_tokens,
              int(row.status == Usage.Status.REJECTED), int(row.status == Usage.Status.UPSTREAM_ERROR))
    with connection.cursor() as cursor:
        cursor.execute(_roll_up_sql(), values)
