"""Quota arithmetic: pure functions of plain values and `now` (no I/O, no Django models).

Tested with plain values in tests/quotas/domain/test_policy.py.
"""

import functools
import logging
import zoneinfo
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from . import tokens
from .money import as_nanos

logger = logging.getLogger("quotas")

LIMIT_FIELDS = ("tokens_per_day", "tokens_per_month", "requests_per_minute", "concurrent_streams",
                "max_tokens_per_request", "allowed_models", "budget_per_day", "budget_per_month")
BUDGET_FIELDS = ("budget_per_day", "budget_per_month")


@dataclass(frozen=True)
class Pool:
    """A scope beyond the user that a request also spends from (docs/quotas.md, "Teams and keys"): its API key's
    spend limits ("key"), its team's pool ("team") and the member's cap in that pool ("member"). Every limit is
    optional (None: no window); money in NANOS. The key's windows are in its user's zone, a team's and a member's in
    the team's."""

    owner: str  # "key", "team" or "member"
    id: int  # the key's or the team's
    name: str  # for messages: the key's prefix, the team's name
    timezone: str = "UTC"
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    budget_per_day: int | None = None
    budget_per_month: int | None = None

    def limit(self, scope: str) -> int | None:
        return getattr(self, SCOPE_FIELDS[scope])


# A window's scope → the limit field that sets it (on Limits and on Pool alike).
SCOPE_FIELDS = {"day": "tokens_per_day", "month": "tokens_per_month", "budget_day": "budget_per_day",
                "budget_month": "budget_per_month"}


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int
    tokens_per_month: int
    requests_per_minute: int
    concurrent_streams: int
    max_tokens_per_request: int
    allowed_models: tuple  # empty: every configured model
    suspended: bool = False
    timezone: str = "UTC"
    # Money budgets in NANOS of SLUICE_CURRENCY (quotas/domain/money.py); None: no budget.
    budget_per_day: int | None = None
    budget_per_month: int | None = None
    # The API key's pools (its spend limits, its team's pool, the member's cap), on top of the user's own limits.
    pools: tuple = ()

    @classmethod
    def combine(cls, plan, override=None):
        """The plan's limits with the override's non-null fields on top (both are attribute bags)."""
        values = {}
        for name in LIMIT_FIELDS:
            value = getattr(override, name, None) if override is not None else None
            values[name] = value if value is not None else getattr(plan, name, None)
        values["allowed_models"] = _model_names(values["allowed_models"], plan)
        for name in BUDGET_FIELDS:
            values[name] = as_nanos(values[name])
        return cls(**values, suspended=bool(getattr(override, "suspended", False)),
                   timezone=getattr(override, "timezone", None) or "UTC")

    def narrowed_to(self, key_models) -> "Limits":
        """These limits for a key that may use only `key_models` (None or empty: the key adds no restriction): the
        models both the plan and the key allow — none, if they share none."""
        if not key_models:
            return self
        names = _model_names(key_models, None)
        allowed = tuple(m for m in names if not self.allowed_models or m in self.allowed_models)
        return replace(self, allowed_models=allowed or NO_MODEL)

    def with_pools(self, pools) -> "Limits":
        return replace(self, pools=tuple(pools))

    def pool(self, owner: str):
        return next((p for p in self.pools if p.owner == owner), None)

    def allows_model(self, model, configured):
        return model in configured and (not self.allowed_models or model in self.allowed_models)


# An allowed_models that matches no configured model (SLUICE_MODELS drops empty names): allows nothing.
NO_MODEL = ("",)


def _model_names(value, plan) -> tuple:
    """allowed_models as a tuple of names (empty: every configured model).

    A stored value that is not a list of names (saved past the admin's validation, from a shell or an older admin)
    fails closed: no model is allowed until an operator fixes it, and each use says so in the log. Raising would
    answer 500 to every request of the plan; ignoring it would widen the plan to every model.
    """
    if value is None:
        return ()
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return tuple(value)
    logger.warning("allowed_models of plan %s (or a user's override of it) is %.80r, not a list of model names: "
                   "no model is allowed until it is fixed in the admin", getattr(plan, "name", "?"), value)
    return NO_MODEL


@dataclass(frozen=True)
class Window:
    """One calendar window: `key` names it in the counter store; [start, end) in the user's zone."""

    scope: str  # "day" or "month" (tokens), "budget_day" or "budget_month" (money, in nanos)
    key: str
    start: datetime
    end: datetime
    limit: int
    owner: str = "user"  # whose window: the user's, or a pool's ("key", "team", "member": Pool.owner)
    owner_id: int | None = None  # the pool's id (the key's, the team's)
    owner_name: str = ""  # the pool's name, for messages

    @property
    def is_money(self) -> bool:
        return self.scope.startswith("budget_")

    @property
    def period(self) -> str:
        """"day" or "month"."""
        return self.scope.removeprefix("budget_")

    def seconds_left(self, now: datetime) -> float:
        return max(0.0, (self.end - now).total_seconds())


def calendar_windows(limits: Limits, now: datetime):
    """Today's and this month's windows in the user's timezone, as (day, month)."""
    zone = zoneinfo.ZoneInfo(limits.timezone)
    day_key, day_start, day_end, month_key, month_start, month_end = _periods(zone, now.astimezone(zone).date())
    return (
        Window("day", day_key, day_start, day_end, limits.tokens_per_day),
        Window("month", month_key, month_start, month_end, limits.tokens_per_month),
    )


@functools.lru_cache(maxsize=1024)
def _periods(zone, local_date):
    """The day and the month of `local_date` in `zone`: their keys and [start, end) bounds. Cached: every request
    computes them for each of its owners (the user, a key, a team), and they change once a day per zone."""
    day_start = datetime(local_date.year, local_date.month, local_date.day, tzinfo=zone)
    # Add a day via the calendar, not 24 h, so DST days are 23 or 25 hours long.
    next_day = (day_start.replace(tzinfo=None) + timedelta(days=1, hours=3)).replace(hour=0)
    day_end = next_day.replace(tzinfo=zone)
    month_start = day_start.replace(day=1)
    month_end = (month_start.replace(tzinfo=None) + timedelta(days=32)).replace(day=1, tzinfo=zone)
    return (local_date.strftime("%Y-%m-%d"), day_start, day_end, local_date.strftime("%Y-%m"), month_start,
            month_end)


def budget_windows(limits: Limits, now: datetime):
    """The money windows of the budgets the user has (none, day, month or both), over the same calendar periods as
    the token windows; limits in nanos."""
    day, month = calendar_windows(limits, now)
    return tuple(Window(f"budget_{w.scope}", w.key, w.start, w.end, budget)
                 for w, budget in ((day, limits.budget_per_day), (month, limits.budget_per_month))
                 if budget is not None)


def pool_windows(pool: Pool, now: datetime, money: bool):
    """A pool's windows that have a limit (tokens; money too when `money`: the request is priced), over the calendar
    periods of the pool's zone."""
    day, month = calendar_windows(Limits(0, 0, 0, 0, 0, (), timezone=pool.timezone), now)
    scopes = (("day", day), ("month", month))
    if money:
        scopes += (("budget_day", day), ("budget_month", month))
    return tuple(Window(scope, w.key, w.start, w.end, pool.limit(scope), pool.owner, pool.id, pool.name)
                 for scope, w in scopes if pool.limit(scope) is not None)


def request_windows(limits: Limits, now: datetime, money: bool):
    """Every window a request leases: the user's token windows (day, month: always first), the user's budgets when
    priced, then each pool's windows."""
    windows = calendar_windows(limits, now)
    if money:
        windows += budget_windows(limits, now)
    for pool in limits.pools:
        windows += pool_windows(pool, now, money)
    return windows


def window_limit(window: Window, limits: Limits) -> int:
    """A window's limit under `limits` (a refreshed plan): 0 while suspended; a limit that was removed since the
    stream began (a budget, a pool, a key's team) no longer limits it (NO_BUDGET)."""
    if limits.suspended:
        return 0
    if window.owner == "user":
        value = getattr(limits, SCOPE_FIELDS[window.scope])
    else:
        pool = next((p for p in limits.pools if p.owner == window.owner and p.id == window.owner_id), None)
        value = None if pool is None else pool.limit(window.scope)
    return NO_BUDGET if value is None else value


# A money window's limit when its budget is removed mid-stream: 10⁶ currency units, far below 2⁵³ nanos.
NO_BUDGET = 10**15


def tokens_left(remaining_units, rates) -> int:
    """What is left, in tokens: each window's units divided by its rate (1 for tokens), the tightest window's."""
    return min(units // max(1, rate) for units, rate in zip(remaining_units, rates)) if remaining_units else 0


# OpenAI's chat format (the cookbook's num_tokens_from_messages, gpt-4o and later): each message costs 3 tokens of
# framing around its fields, a name 1 more, and every reply is primed with 3.
MESSAGE_TOKENS = 3
NAME_TOKENS = 1
REPLY_PRIMING_TOKENS = 3
# A content part that is not text (an image, audio, a file): Sluice cannot see its size, so it reserves what the
# largest gpt-4o image costs at "high" detail (85 + 170 per 512-px tile, at most 8 tiles). Settlement charges the
# provider's own figure either way (docs/quotas.md, "What is charged").
NON_TEXT_PART_TOKENS = 85 + 170 * 8


def estimate_tokens(text: str) -> int:
    """The tokens of `text` in o200k_base (quotas/domain/tokens.py): exact for OpenAI's current models."""
    return tokens.count(text)


def estimate_prompt_tokens(messages) -> int:
    """A prompt's tokens as OpenAI counts them: every string field of each message (role, content, name,
    tool_call_id), the text of content parts, the name and arguments of an assistant's tool calls, and the
    chat format's framing."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_TOKENS
        for key, value in message.items():
            if isinstance(value, str):
                total += tokens.count(value) + (NAME_TOKENS if key == "name" else 0)
            elif key == "content" and isinstance(value, list):
                total += sum(_part_tokens(part) for part in value)
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(_call_tokens(call) for call in value)
            elif key == "function_call":  # the legacy single call
                total += _call_tokens({"function": value})
    return total


def _part_tokens(part) -> int:
    if isinstance(part, dict) and part.get("type") == "text":
        return tokens.count(str(part.get("text", "")))
    return NON_TEXT_PART_TOKENS


def _call_tokens(call) -> int:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return 0
    return sum(tokens.count(value) for value in (function.get("name"), function.get("arguments"))
               if isinstance(value, str))


# The counts of short deltas already seen: a streamed delta is mostly one token of text, and a language's common
# tokens recur, so most paced tokens find their count here (one dictionary look-up instead of three calls into the
# tokenizer). Bounded: emptied when full (at most ~2 MB of short strings and small integers).
_SHORT_DELTA = 32  # characters
_COUNTS_KEPT = 16_384
_counts: dict[str, int] = {}


def chunk_tokens(content: str) -> int:
    """Tokens metered for one streamed delta of text: its o200k_base tokens, at least one (a delta the provider sent
    came from at least one generated token)."""
    count = _counts.get(content)
    if count is None:
        count = max(1, tokens.count(content))
        if len(content) <= _SHORT_DELTA:
            if len(_counts) >= _COUNTS_KEPT:
                _counts.clear()
            _counts[content] = count
    return count


def clamp_max_tokens(requested: int | None, plan_max: int, remaining: int, choices: int = 1) -> int:
    """The completion budget of each of a request's `choices` (n): asked for, within the plan, and all of them
    within what remains."""
    ceiling = min(plan_max, remaining // choices)
    return max(0, ceiling if requested is None else min(requested, ceiling))


def first_lease(prompt_tokens: int, max_tokens: int, block: int) -> int:
    """Admission reserves the prompt and a first block of completion tokens."""
    return prompt_tokens + min(block, max_tokens)


def exhausted_window(windows, remaining):
    """The window that refuses more tokens, given each window's tokens left after the last lease (same order).

    Of those with nothing left, the one that resets last: no retry before its reset can succeed. With no
    figures (or none at zero), the first window (the day).
    """
    spent = [w for w, left in zip(windows, remaining) if left <= 0]
    return max(spent, key=lambda w: w.end) if spent else windows[0]
