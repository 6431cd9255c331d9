"""Admission: the per-minute request rate and the concurrent-stream slots, in the shared counter store.

The gateway's middleware calls `hit_rate`; a completion takes a slot with `acquire_slot` and gives it back with
`release_slot` when it settles (streaming/streams/completion.py).
"""

import logging

from django.conf import settings

from ..store import StoreUnavailable, get_store
from .exceptions import ConcurrencyLimited, CounterStoreDown, RateLimited
from .policy import Limits

logger = logging.getLogger("quotas")

RATE_WINDOW_SECONDS = 60.0


def user_key(user_id, suffix):
    # The hash tag {u<id>} keeps one user's keys in one Redis Cluster slot (multi-key scripts).
    return f"sluice:{{u{user_id}}}:{suffix}"


def team_key(team_id, suffix):
    # A team's pool and its members' caps: one hash tag per team.
    return f"sluice:{{t{team_id}}}:{suffix}"


async def hit_rate(user_id, limits: Limits, now: float):
    """Count a request against the per-minute limit; raise RateLimited if it is over."""
    try:
        result = await get_store().hit(user_key(user_id, "rpm"), limits.requests_per_minute,
                                       RATE_WINDOW_SECONDS, now)
    except StoreUnavailable:
        logger.warning("counter store unavailable for the request rate (fail %s)",
                       "open" if settings.QUOTA_RATE_FAIL_OPEN else "closed")
        if settings.QUOTA_RATE_FAIL_OPEN:
            return None
        raise CounterStoreDown("rate limit") from None
    if not result.allowed:
        raise RateLimited(limits.requests_per_minute, result.reset_seconds)
    return result


async def refund_rate(user_id, rate) -> bool:
    """Give back the request `hit_rate` counted (its result `rate`): the request was refused for another limit
    (concurrency, tokens, model) and never reached a provider, so it does not spend the per-minute budget
    (docs/quotas.md). False when there was nothing to give back or the store could not be reached."""
    member = getattr(rate, "member", None)
    if member is None:
        return False
    try:
        await get_store().unhit(user_key(user_id, "rpm"), member)
    except StoreUnavailable:
        logger.warning("could not give back a refused request's rate hit; it leaves the window in a minute")
        return False
    return True


async def peek_rate(user_id, limits: Limits, now: float):
    """The request window as it stands, or None if the store cannot say (headers only)."""
    try:
        return await get_store().peek_rate(user_key(user_id, "rpm"), limits.requests_per_minute,
                                           RATE_WINDOW_SECONDS, now)
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
        raise CounterStoreDown("concurrency limit") from None
    if not result.acquired:
        raise ConcurrencyLimited(limits.concurrent_streams)
    return key


async def release_slot(key: str | None, holder: str):
    if key is None:
        return
    try:
        await get_store().release_slot(key, holder)
    except StoreUnavailable:
        # The slot's TTL frees it anyway.
        logger.warning("could not release a concurrency slot; it expires within QUOTA_SLOT_TTL")
