"""Permits to call an upstream: the shared AIMD limit and circuit breaker in the counter store, a fair queue here.

One store call takes a permit (and checks the breakers and the user's fair share), one gives it back (and reports
the outcome, which moves the limit and the breakers): docs/resilience.md. The permit is a lease with a TTL,
renewed while events flow, so a crashed worker's permits free themselves. A stream whose client has stopped
reading for UPSTREAM_PREEMPT_AFTER gives its permit up when its user holds more than its fair share while another
user waits (`Upstream._preempt_stalled`).
"""

import asyncio
import hashlib
import logging
import math
import time
import weakref
from contextlib import suppress
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
        breaker_cooldown_seconds=settings.UPSTREAM_BREAKER_COOLDOWN, ttl_seconds=settings.UPSTREAM_PERMIT_TTL,
        fair_share=settings.UPSTREAM_FAIR_SHARE,
        demand_seconds=backoff.demand_seconds(settings.UPSTREAM_QUEUE_POLL_INTERVAL),
        breaker_min_users=settings.UPSTREAM_BREAKER_MIN_USERS)


def saturated(retry_after_seconds):
    return UpstreamError(
        429, "upstream_saturated",
        f"The upstream provider is saturated: too many requests are waiting for it. "
        f"Retry after {math.ceil(retry_after_seconds)} s.", retry_after_seconds)


def unavailable(retry_after_seconds, own=False):
    if own:  # the user's own breaker: a provider failing for this user's requests only, or requests it fails on
        return UpstreamError(
            503, "upstream_unavailable",
            f"The upstream provider keeps failing on your requests; they are paused. Retry after "
            f"{math.ceil(retry_after_seconds)} s.", retry_after_seconds)
    return UpstreamError(
        503, "upstream_unavailable",
        f"The upstream provider is failing; requests to it are paused. Retry after {math.ceil(retry_after_seconds)} s.",
        retry_after_seconds)


def preempted():
    return UpstreamError(
        429, "upstream_preempted",
        f"The stream was ended: its client stopped reading for {settings.UPSTREAM_PREEMPT_AFTER:g} s while other "
        f"users waited for the upstream provider.")


@dataclass(eq=False)
class Permit:
    upstream: "Upstream"
    holder: str
    limit: float  # the limit it was granted under: a 429 cuts from there
    probe: bool
    acquired_at: float  # monotonic
    guarded: bool = True  # False: taken while the store was down (fail open)
    user: str = ""  # whose request it is: fair shares, the user's own breaker
    reported: bool = False  # the probe's success is recorded already
    released: bool = False
    stream: object = None  # the stream it guards once the first token is in (first_token.GuardedStream)
    # Since when the stream's reader has not asked for more (monotonic; None while it waits for the provider).
    idle_since: float | None = None
    preempted: bool = False  # given up for another user: the stream ends, its outcome is NONE

    async def release(self, outcome):
        # The stream is not the permit's to end any more; dropping it also breaks the stream <-> permit reference
        # cycle, so a finished request is freed at once rather than by the cyclic collector (docs/performance.md,
        # "Session 13").
        self.stream = None
        await self.upstream.release(self, outcome)

    def attach(self, stream):
        """The permit now guards `stream` (its `aclose` gives the permit back): it may be preempted."""
        self.stream = stream
        self.upstream.attach(self)

    async def report_success(self):
        """The half-open probe got its first token: close the breaker now, not at the stream's end."""
        if self.probe and self.guarded and not self.reported:
            self.reported = True
            await self.upstream.call_store("release_permit", self.holder, OUTCOME_OK, self.limit, permit_policy(),
                                           time.time(), keep=True, user=self.user)

    async def renew(self):
        if self.guarded and not self.released:
            await self.upstream.call_store("renew_permit", self.holder, settings.UPSTREAM_PERMIT_TTL, time.time())


def store_key(target_key: str) -> str:
    """The counter store's record of a target's limit and breaker (the dashboard reads it too). Hashed: the key names
    no internal address; the hash tag keeps the record on one Redis Cluster slot."""
    return f"sluice:{{up:{hashlib.sha256(target_key.encode()).hexdigest()[:16]}}}:upstream"


class Upstream:
    """One provider (base URL) as this process and event loop see it."""

    def __init__(self, url):
        # `url`: the target's key (its URL, and the provider's model name for a catalogue deployment).
        self.key = store_key(url)
        self.queue = FairQueue(self._try_acquire, self._give_back, lambda: settings.UPSTREAM_QUEUE_POLL_INTERVAL)
        self.hold_seconds = 1.0  # moving average of how long permits are held, for the queue's Retry-After
        self.limit = float(settings.UPSTREAM_CONCURRENCY_MAX)  # as last seen
        self.streams: set[Permit] = set()  # permits of this process's streams past their first token
        self._marked: dict[str, float] = {}  # user -> when the store last heard that it waits here (monotonic)
        self._preempting = None  # the task that watches for stalled streams while there are any
        self._look = asyncio.Event()  # a request was refused here: look for stalled streams now, not at the tick
        self.open_until = 0.0  # (monotonic) until when the store said its breaker is open for everyone

    def healthy(self) -> bool:
        """False while its breaker was last seen open (for everyone): routing tries its other deployments first."""
        return self.open_until <= time.monotonic()

    async def call_store(self, operation, *args, **kwargs):
        try:
            return await getattr(get_store(), operation)(self.key, *args, **kwargs)
        except StoreUnavailable:
            logger.warning("counter store unavailable for the upstream's %s", operation)
            return None

    def _waiting(self, policy):
        """The users queued here whose waiting the store should hear of again (each once per third of its memory)."""
        if not policy.fair_share:
            return ()
        now = time.monotonic()
        queued = {str(user) for user in self.queue.users()}
        for user in list(self._marked):
            if user not in queued:
                del self._marked[user]
        due = tuple(user for user in queued if now - self._marked.get(user, -math.inf) >= policy.demand_seconds / 3)
        for user in due:
            self._marked[user] = now
        return due

    async def _try_acquire(self, user, holder) -> PermitResult:
        policy = permit_policy()
        try:
            result = await get_store().acquire_permit(self.key, holder, policy, time.time(), str(user),
                                                      self._waiting(policy))
        except StoreUnavailable:
            if settings.UPSTREAM_LIMIT_FAIL_OPEN:
                logger.warning("counter store unavailable: the upstream limit fails open")
                return UNGUARDED
            raise UpstreamError(503, "service_unavailable",
                                "The gateway's upstream limiter is temporarily unavailable. Retry shortly.", 5.0)
        if result.status == PERMIT_ACQUIRED:
            self._marked.pop(str(user), None)  # the store forgot its wait: tell it again if more are queued
        elif result.status == PERMIT_FULL:
            self._look.set()  # the store knows this user waits: a stalled stream may owe it its permit
        if result.status != PERMIT_OPEN:
            self.limit = result.limit
        return result

    async def _give_back(self, user, holder, result):
        if result is not UNGUARDED:
            await self.call_store("release_permit", holder, OUTCOME_NONE, result.limit, permit_policy(), time.time(),
                                  user=str(user))
            self.queue.notify()

    async def acquire(self, user, holder, timeout, retry=False) -> Permit:
        """A permit, at once or in turn; raises upstream_saturated (429) or upstream_unavailable (503).

        A retry waits at the head of its user's line: it has waited its turn already.
        """
        result = None if self.queue.length else await self._try_acquire(user, holder)
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
            if not result.own:
                self.open_until = time.monotonic() + result.retry_after_seconds
            raise unavailable(max(1.0, result.retry_after_seconds), own=result.own)
        self.open_until = 0.0
        return Permit(self, holder, result.limit, result.probe, time.monotonic(), guarded=result is not UNGUARDED,
                      user=str(user))

    def queue_retry_after(self):
        return backoff.queue_retry_after(self.queue.length + 1, self.limit, self.hold_seconds)

    async def release(self, permit, outcome):
        """Give the permit back with the attempt's outcome; once, and despite a second cancellation."""
        if permit.released:
            return
        permit.released = True
        self.streams.discard(permit)
        if not permit.guarded:
            return
        if permit.preempted:
            outcome = OUTCOME_NONE  # ended for another user: it says nothing of the provider
        if outcome == OUTCOME_OK:  # a refusal's short hold says nothing about how fast the queue moves
            self.hold_seconds = backoff.moving_average(self.hold_seconds, time.monotonic() - permit.acquired_at)
        if permit.reported and outcome == OUTCOME_OK:
            outcome = OUTCOME_NONE  # the probe's success counted already
        await asyncio.shield(self._release(permit, outcome))

    async def _release(self, permit, outcome):
        try:
            limit = await self.call_store("release_permit", permit.holder, outcome, permit.limit, permit_policy(),
                                          time.time(), user=permit.user)
        finally:
            self.queue.notify()
        if outcome == OUTCOME_THROTTLED and limit is not None:
            logger.info("upstream 429: limit %.2f (admitted under %.2f)", limit, permit.limit)

    # Preemption: a stalled stream gives its permit up for a user below its fair share ---------------------------

    def attach(self, permit):
        if not permit.guarded or permit.released:
            return
        self.streams.add(permit)
        if settings.UPSTREAM_FAIR_SHARE and settings.UPSTREAM_PREEMPT_AFTER > 0 and (
                self._preempting is None or self._preempting.done()):
            self._preempting = asyncio.create_task(self._preempt_stalled())

    async def _preempt_stalled(self):
        """While this process has streams: each tick, or at once when a request is refused here, if some have
        stalled (their clients have not read for UPSTREAM_PREEMPT_AFTER), ask the store which users hold more than
        their fair share while another waits (one call per tick or refusal, and so at most one per queue poll
        while anyone waits; none while no stream stalls), and end that many of their stalled streams, the longest
        stalled first."""
        while self.streams:
            after = settings.UPSTREAM_PREEMPT_AFTER
            self._look.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(backoff.preempt_tick(after)):
                    await self._look.wait()
            now = time.monotonic()
            stalled = [p for p in self.streams if p.idle_since is not None and now - p.idle_since >= after]
            if not stalled:
                continue
            try:
                excess = await get_store().permit_excess(self.key, permit_policy(), time.time())
            except StoreUnavailable:
                logger.debug("counter store unavailable: no preemption this tick")
                continue
            for user, count in excess.items():
                mine = sorted((p for p in stalled if p.user == user), key=lambda p: p.idle_since)
                for permit in mine[:count]:
                    try:
                        await self.preempt(permit)
                    except Exception:  # closing a provider stream failed: its permit is released regardless
                        logger.exception("preempting %s failed", permit.holder)

    async def preempt(self, permit):
        """End the permit's stream (its provider request is closed; its reader gets what was read, then an
        `upstream_preempted` error event) and give the permit back with no outcome."""
        if permit.released or permit.idle_since is None or permit.stream is None:
            return  # gone, or its reader has asked for more since
        logger.info("preempting a stalled stream of user %s: %s", permit.user, permit.holder)
        permit.preempted = True
        await asyncio.shield(permit.stream.aclose())


_upstreams: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Upstream]]" = weakref.WeakKeyDictionary()


def get_upstream(key) -> Upstream:
    """This event loop's view of the upstream (a deployment: streaming/provider/targets.py, `Target.key`) — its
    queue's futures belong to one loop."""
    by_key = _upstreams.setdefault(asyncio.get_running_loop(), {})
    upstream = by_key.get(key)
    if upstream is None:
        upstream = by_key[key] = Upstream(key)
    return upstream


def upstreams() -> dict:
    """This event loop's upstreams by key (the dashboard's health table)."""
    try:
        return dict(_upstreams.get(asyncio.get_running_loop(), {}))
    except RuntimeError:
        return {}
