"""Quota arithmetic: pure functions of plain values and `now` (no I/O, no Django models).

Tested with plain values in tests/quotas/domain/test_policy.py.
"""

import logging
import math
import re
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta

logger = logging.getLogger("quotas")

LIMIT_FIELDS = ("tokens_per_day", "tokens_per_month", "requests_per_minute", "concurrent_streams",
                "max_tokens_per_request", "allowed_models")


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

    @classmethod
    def combine(cls, plan, override=None):
        """The plan's limits with the override's non-null fields on top (both are attribute bags)."""
        values = {}
        for name in LIMIT_FIELDS:
            value = getattr(override, name, None) if override is not None else None
            values[name] = value if value is not None else getattr(plan, name)
        values["allowed_models"] = _model_names(values["allowed_models"], plan)
        return cls(**values, suspended=bool(getattr(override, "suspended", False)),
                   timezone=getattr(override, "timezone", None) or "UTC")

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

    scope: str  # "day" or "month"
    key: str
    start: datetime
    end: datetime
    limit: int

    def seconds_left(self, now: datetime) -> float:
        return max(0.0, (self.end - now).total_seconds())


def calendar_windows(limits: Limits, now: datetime):
    """Today's and this month's windows in the user's timezone, as (day, month)."""
    local = now.astimezone(zoneinfo.ZoneInfo(limits.timezone))
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # Add a day via the calendar, not 24 h, so DST days are 23 or 25 hours long.
    next_day = (day_start + timedelta(days=1, hours=3)).replace(hour=0, tzinfo=None)
    day_end = next_day.replace(tzinfo=local.tzinfo)
    month_start = day_start.replace(day=1)
    month_end = (month_start.replace(tzinfo=None) + timedelta(days=32)).replace(day=1, tzinfo=local.tzinfo)
    return (
        Window("day", local.strftime("%Y-%m-%d"), day_start, day_end, limits.tokens_per_day),
        Window("month", local.strftime("%Y-%m"), month_start, month_end, limits.tokens_per_month),
    )


_TOKENISH = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A conservative token count for text when no tokenizer is available offline.

    Each word and each punctuation mark counts, and long words count once per 4 characters: at
    or above what BPE tokenizers give for English, and above the simulator's word count.
    """
    return sum(max(1, math.ceil(len(t) / 4)) for t in _TOKENISH.findall(text))


def estimate_prompt_tokens(messages) -> int:
    total = 3  # the reply's priming tokens
    for message in messages:
        total += 4  # role and separators
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        total += estimate_tokens(str(content or ""))
        if message.get("name"):
            total += estimate_tokens(str(message["name"]))
    return total


def chunk_tokens(content: str) -> int:
    """Tokens metered for one streamed delta: one per chunk, or its words if a chunk packs several."""
    return max(1, len(content.split()))


def clamp_max_tokens(requested: int | None, plan_max: int, remaining: int) -> int:
    """The completion budget for a request: asked for, within the plan and what remains."""
    ceiling = min(plan_max, remaining)
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
