"""Resilience to the provider: retries before the first byte, a shared adaptive limit with a fair queue, a
circuit breaker, and the first-token timeout. docs/resilience.md states the policy and its settings.

The stream's lifecycle (streaming/streams/completion.py) calls `open_stream` and `complete` here, never the client (client.py) directly. Each attempt takes a
permit (permits.py: one store call, which also checks the breaker; a fair queue when none is free), calls the
provider, and gives the permit back with the outcome (one store call, which moves the AIMD limit and the
breaker). 429s, 5xx, connection errors and timeouts are retried with exponential backoff and full jitter,
never sooner than the provider's Retry-After, within UPSTREAM_RETRY_DEADLINE — and only before the first byte:
a stream is returned once its first token is in (or, from a slow provider, after STREAM_HEARTBEAT_INTERVAL, so
that the client gets heartbeats), and nothing after that is retried.
"""

import asyncio
import dataclasses
import logging
import random
import time

from django.conf import settings

from quotas.domain import alerts
from quotas.store.base import OUTCOME_FAILED, OUTCOME_NONE, OUTCOME_OK, OUTCOME_THROTTLED

from ..telemetry import metrics
from . import backoff, client
from .endpoints import CHAT
from .errors import UpstreamError
from .first_token import GuardedStream, open_to_first_token
from .permits import get_upstream
from .targets import Target, as_targets

__all__ = ["open_stream", "complete", "retry_policy"]

logger = logging.getLogger("streaming.provider")


def retry_policy() -> backoff.RetryPolicy:
    return backoff.RetryPolicy(
        deadline_seconds=settings.UPSTREAM_RETRY_DEADLINE, max_attempts=settings.UPSTREAM_RETRY_MAX_ATTEMPTS,
        base_seconds=settings.UPSTREAM_BACKOFF_BASE, max_backoff_seconds=settings.UPSTREAM_BACKOFF_MAX,
        retry_after_cap_seconds=settings.UPSTREAM_RETRY_AFTER_CAP)


def outcome_of(error: UpstreamError) -> str:
    if error.code == "upstream_rate_limited":
        return OUTCOME_THROTTLED
    return OUTCOME_FAILED if error.retryable else OUTCOME_NONE


async def open_stream(where, body, request_id, fair_key, endpoint=CHAT) -> GuardedStream:
    """A streaming completion (at `endpoint`: chat unless told), returned once its first token arrived; it holds its
    permit until closed, and names the target that served it (`.target`).

    `where`: a URL, a target or the targets to try in order (streaming/provider/targets.py); `body`: the provider's
    body, or a function of the target that makes it (each deployment has its own model name and limit field)."""

    async def attempt(target, permit):
        events, seen, pending = await open_to_first_token(
            target, body_for(body, target), request_id, target.first_token_seconds(),
            settings.STREAM_HEARTBEAT_INTERVAL, endpoint)
        stream = GuardedStream(events, seen, permit, pending)
        stream.target = target
        try:
            await permit.report_success()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    return await _with_retries(as_targets(where), request_id, fair_key, attempt, keeps_permit=True)


async def complete(where, body, request_id, fair_key, endpoint=CHAT) -> tuple[bytes, Target]:
    """A non-streaming completion or embedding (no first-token timeout: its first token is its whole answer), and
    the target that served it."""

    async def attempt(target, permit):
        return await client.complete(target, body_for(body, target), request_id, endpoint), target

    return await _with_retries(as_targets(where), request_id, fair_key, attempt, keeps_permit=False)


def body_for(body, target):
    return body(target) if callable(body) else body


async def _with_retries(targets, request_id, fair_key, attempt, keeps_permit):
    """Each target in turn (fallback: at once, before the first byte only), then again from the first with backoff,
    within the retry deadline and attempts. A target whose breaker is open, or whose queue is full, is passed over
    for the next; the last one's refusal is the answer."""
    policy = retry_policy()
    started = None  # the deadline counts from the first attempt: the first wait in the queue has its own timeout
    attempts = 0
    turn = 0  # the index of the next target to try
    while True:
        target = targets[turn % len(targets)]
        last_of_round = turn % len(targets) == len(targets) - 1
        turn += 1
        guard = get_upstream(target.key)
        queue_timeout = settings.UPSTREAM_QUEUE_TIMEOUT
        if attempts:  # a retry waits in the queue no longer than the deadline leaves
            queue_timeout = min(queue_timeout, max(0.0, started + policy.deadline_seconds - time.monotonic()))
        try:
            permit = await guard.acquire(fair_key, request_id, queue_timeout, retry=attempts > 0)
        except UpstreamError as refusal:  # its breaker is open, or its queue is full
            refusal.target = target
            if refusal.code == "upstream_unavailable" and not guard.healthy():
                # Operators hear of it (once per 10 minutes and deployment: a dictionary look-up after the first).
                alerts.breaker_opened(target.name)
            if last_of_round or (started is not None and time.monotonic() > started + policy.deadline_seconds):
                raise
            metrics.UPSTREAM_FALLBACKS.labels(target.provider).inc()
            logger.info("upstream %s refused %s (%s): trying the next deployment", target.name, request_id,
                        refusal.code)
            continue
        attempts += 1
        if started is None:
            started = time.monotonic()
        try:
            result = await attempt(target, permit)
        except UpstreamError as error:
            error.target = target
            await permit.release(outcome_of(error))
            metrics.UPSTREAM_ERRORS.labels(error.code, target.provider).inc()
            if not error.retryable:
                raise
            if not last_of_round and attempts < policy.max_attempts and (
                    time.monotonic() < started + policy.deadline_seconds):
                metrics.UPSTREAM_FALLBACKS.labels(target.provider).inc()
                logger.info("upstream %s for %s at %s: falling back to the next deployment", error.code, request_id,
                            target.name)
                continue
            delay = backoff.retry_delay(policy, attempts, error.retry_after_seconds, random.random())
            if not backoff.may_retry(policy, attempts, started, time.monotonic(), delay):
                if error.retry_after_seconds is None:
                    raise dataclasses.replace(error, retry_after_seconds=delay) from None
                raise
            logger.info("upstream %s for %s: retry %d in %.2f s", error.code, request_id, attempts, delay)
            metrics.UPSTREAM_RETRIES.inc()
            await asyncio.sleep(delay)
            continue
        except BaseException:  # cancelled: the client went away
            await permit.release(OUTCOME_NONE)
            raise
        if not keeps_permit:
            await permit.release(OUTCOME_OK)
        return result
