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

from quotas.store.base import OUTCOME_FAILED, OUTCOME_NONE, OUTCOME_OK, OUTCOME_THROTTLED

from ..telemetry import metrics
from . import backoff, client
from .endpoints import CHAT
from .errors import UpstreamError
from .first_token import GuardedStream, open_to_first_token
from .permits import get_upstream

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


async def open_stream(url, body, request_id, fair_key, endpoint=CHAT) -> GuardedStream:
    """A streaming completion (at `endpoint`: chat unless told), returned once its first token arrived; it holds its
    permit until closed."""

    async def attempt(permit):
        events, seen, pending = await open_to_first_token(
            url, body, request_id, settings.UPSTREAM_FIRST_TOKEN_TIMEOUT, settings.STREAM_HEARTBEAT_INTERVAL,
            endpoint)
        stream = GuardedStream(events, seen, permit, pending)
        try:
            await permit.report_success()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    return await _with_retries(url, request_id, fair_key, attempt, keeps_permit=True)


async def complete(url, body, request_id, fair_key, endpoint=CHAT) -> bytes:
    """A non-streaming completion or embedding (no first-token timeout: its first token is its whole answer)."""

    async def attempt(permit):
        return await client.complete(url, body, request_id, endpoint)

    return await _with_retries(url, request_id, fair_key, attempt, keeps_permit=False)


async def _with_retries(url, request_id, fair_key, attempt, keeps_permit):
    policy = retry_policy()
    guard = get_upstream(url)
    started = None  # the deadline counts from the first attempt: the first wait in the queue has its own timeout
    attempts = 0
    while True:
        queue_timeout = settings.UPSTREAM_QUEUE_TIMEOUT
        if attempts:  # a retry waits in the queue no longer than the deadline leaves
            queue_timeout = min(queue_timeout, max(0.0, started + policy.deadline_seconds - time.monotonic()))
        permit = await guard.acquire(fair_key, request_id, queue_timeout, retry=attempts > 0)
        attempts += 1
        if started is None:
            started = time.monotonic()
        try:
            result = await attempt(permit)
        except UpstreamError as error:
            await permit.release(outcome_of(error))
            metrics.UPSTREAM_ERRORS.labels(error.code).inc()
            if not error.retryable:
                raise
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
