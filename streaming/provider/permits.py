"""Permits to call an upstream: the shared AIMD limit and circuit breaker in the counter store, a fair queue here.

One store call takes a permit (and checks the breaker), one gives it back (and reports the outcome, which moves
the limit and the breaker): docs/resilience.md. The permit is a lease with a TTL, renewed while events flow, so
a crashed worker's permits free themselves.
"""

import asyncio
import hashlib
import logging
import math
import time
import weakref
from dataclasses import dataclass

from django.conf import settings

from quotas.store import StoreUnavailable, get_store
from quotas.store.base import (OUTCOME_NONE, OUTCOME_OK, OUTCOME_THROTTLED, PERMIT_ACQUIRED, PERMIT_FULL,
                               PERMIT_OPEN, PermitPolicy, PermitResult)

from ..telemetry import metrics
from . import backoff
from .errors import UpstreamError
from .queue import FairQueue

logger = logging.getLogger("streaming.provider")

# What a permit is when the store is down and the limit fails open: nothing to give back.
UNGUARDED = PermitResult(PERMIT_ACQUIRED, 0.0, 0)


def permit_policy() -> PermitPolicy:
    return PermitPolicy(
        min_limit=settings.UPSTREAM_CONCURRENCY_MIN, max_limit=settings.UPSTREAM_CONCURRENCY_MAX,
        increase=settings.UPSTREAM_AIMD_INCREASE, decrease_factor=settings.UPSTREAM_AIMD_DECREASE_FACTOR,
        breaker_threshold=settings.UPSTREAM_BREAKER_THRESHOLD,
        breaker_cooldown_seconds=settings.UPSTREAM_BREAKER_COOLDOWN, ttl_seconds=settings.UPSTREAM_PERMIT_TTL)


def saturated(retry_after_seconds):
    return UpstreamError(
        429, "upstream_saturated",
        f"The upstream provider is saturated: too many requests are waiting for it. "
        f"Retry after {math.ceil(retry_after_seconds)} s.", retry_after_seconds)


def unavailable(retry_after_seconds):
    return UpstreamError(
        503, "upstream_unavailable",
        f"The upstream provider is failing; requests to it are paused. Retry after {math.ceil(retry_after_seconds)} s.",
        retry_after_seconds)


@dataclass(eq=False)
class Permit:
    upstream: "Upstream"
    holder: str
    limit: float  # the limit it was granted under: a 429 cuts from there
    probe: bool
    acquired_at: float  # monotonic
    guarded: bool = True  # False: taken while the store was down (fail open)
    reported: bool = False  # the probe's success is recorded already
    released: bool = False

    async def release(self, outcome):
        await self.upstream.release(self, outcome)

    async def report_success(self):
        """The half-open probe got its first token: close the breaker now, not at the stream's end."""
        if self.probe and self.guarded and not self.reported:
            self.reported = True
            await self.upstream.call_store("release_permit", self.holder, OUTCOME_OK, self.limit, permit_policy(),
                                           time.time(), keep=True)

    async def renew(self):
        if self.guarded and not self.released:
            await self.upstream.call_store("renew_permit", self.holder, settings.UPSTREAM_PERMIT_TTL, time.time())


class Upstream:
    """One provider (base URL) as this process and event loop see it."""

    def __init__(self, url):
        # Hashed: the key names no internal address; the hash tag keeps the record on one Redis Cluster slot.
        self.key = f"sluice:{{up:{hashlib.sha256(url.encode()).hexdigest()[:16]}}}:upstream"
        self.queue = FairQueue(self._try_acquire, self._give_back, lambda: settings.UPSTREAM_QUEUE_POLL_INTERVAL)
        self.hold_seconds = 1.0  # moving average of how long permits are held, for the queue's Retry-After
        self.limit = float(settings.UPSTREAM_CONCURRENCY_MAX)  # as last seen

    async def call_store(self, operation, *args, **kwargs):
        try:
            return await getattr(get_store(), operation)(self.key, *args, **kwargs)
        except StoreUnavailable:
            logger.warning("counter store unavailable for the upstream's %s", operation)
            return None

    async def _try_acquire(self, holder) -> PermitResult:
        try:
            result = await get_store().acquire_permit(self.key, holder, permit_policy(), time.time())
        except StoreUnavailable:
            if settings.UPSTREAM_LIMIT_FAIL_OPEN:
                logger.warning("counter store unavailable: the upstream limit fails open")
                return UNGUARDED
            raise UpstreamError(503, "service_unavailable",
                                "The gateway's upstream limiter is temporarily unavailable. Retry shortly.", 5.0)
        if result.status != PERMIT_OPEN:
            self.limit = result.limit
        return result

    async def _give_back(self, holder, result):
        if result is not UNGUARDED:
            await self.call_store("release_permit", holder, OUTCOME_NONE, result.limit, permit_policy(), time.time())
            self.queue.notify()

    async def acquire(self, user, holder, timeout, retry=False) -> Permit:
        """A permit, at once or in turn; raises upstream_saturated (429) or upstream_unavailable (503).

        A retry waits at the head of its user's line: it has waited its turn already.
        """
        result = None if self.queue.length else await self._try_acquire(holder)
        if result is None or result.status == PERMIT_FULL:
            if self.queue.length >= settings.UPSTREAM_QUEUE_MAX:
                raise saturated(self.queue_retry_after())
            logger.debug("upstream saturated: %s queued (%d waiting)", holder, self.queue.length + 1)
            metrics.QUEUE_LENGTH.inc()
            try:
                result = await self.queue.wait(user, holder, timeout, first=retry)
            except TimeoutError:
                raise saturated(self.queue_retry_after()) from None
            finally:
                metrics.QUEUE_LENGTH.dec()
        if result.status == PERMIT_OPEN:
            raise unavailable(max(1.0, result.retry_after_seconds))
        return Permit(self, holder, result.limit, result.probe, time.monotonic(), guarded=result is not UNGUARDED)

    def queue_retry_after(self):
        return backoff.queue_retry_after(self.queue.length + 1, self.limit, self.hold_seconds)

    async def release(self, permit, outcome):
        """Give the permit back with the attempt's outcome; once, and despite a second cancellation."""
        if permit.released:
            return
        permit.released = True
        if not permit.guarded:
            return
        if outcome == OUTCOME_OK:  # a refusal's short hold says nothing about how fast the queue moves
            self.hold_seconds = backoff.moving_average(self.hold_seconds, time.monotonic() - permit.acquired_at)
        if permit.reported and outcome == OUTCOME_OK:
            outcome = OUTCOME_NONE  # the probe's success counted already
        await asyncio.shield(self._release(permit, outcome))

    async def _release(self, permit, outcome):
        try:
            limit = await self.call_store("release_permit", permit.holder, outcome, permit.limit, permit_policy(),
                                          time.time())
        finally:
            self.queue.notify()
        if outcome == OUTCOME_THROTTLED and limit is not None:
            logger.info("upstream 429: limit %.2f (admitted under %.2f)", limit, permit.limit)


_upstreams: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Upstream]]" = weakref.WeakKeyDictionary()


def get_upstream(url) -> Upstream:
    """This event loop's view of the upstream at `url` (its queue's futures belong to one loop)."""
    by_url = _upstreams.setdefault(asyncio.get_running_loop(), {})
    upstream = by_url.get(url)
    if upstream is None:
        upstream = by_url[url] = Upstream(url)
    return upstream
