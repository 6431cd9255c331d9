"""streaming/provider/backoff.py: retry and queue arithmetic with plain values (no I/O, no clock, no randomness)."""

import pytest

from streaming.provider.backoff import RetryPolicy, backoff_ceiling, may_retry, moving_average, queue_retry_after, \
    retry_delay

POLICY = RetryPolicy(deadline_seconds=20, max_attempts=5, base_seconds=0.2, max_backoff_seconds=5,
                     retry_after_cap_seconds=10)


def test_the_ceiling_doubles_up_to_its_cap():
    assert [backoff_ceiling(POLICY, n) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5, 5]
    assert backoff_ceiling(POLICY, 10_000) == 5  # no overflow


def test_full_jitter_spans_zero_to_the_ceiling():
    assert retry_delay(POLICY, 3, None, 0.0) == 0.0
    assert retry_delay(POLICY, 3, None, 0.5) == pytest.approx(0.4)
    assert retry_delay(POLICY, 3, None, 0.999) == pytest.approx(0.7992)


def test_retry_after_is_a_floor_and_capped():
    assert retry_delay(POLICY, 1, 2.0, 0.5) == 2.0  # never sooner than the provider asked
    assert retry_delay(POLICY, 6, 0.5, 0.5) == pytest.approx(2.5)  # the jitter may be later
    assert retry_delay(POLICY, 1, 3600, 0.5) == 10  # a provider asking for an hour is capped
    assert retry_delay(POLICY, 1, -3, 0.0) == 0.0


def test_retries_stop_at_the_deadline_and_the_attempt_limit():
    assert may_retry(POLICY, attempts=1, started=100, now=101, delay=1)
    assert not may_retry(POLICY, attempts=1, started=100, now=119.5, delay=0.5)  # the sleep would end past it
    assert not may_retry(POLICY, attempts=5, started=100, now=101, delay=0)
    disabled = RetryPolicy(0, 5, 0.2, 5, 10)
    assert not disabled.enabled and not may_retry(disabled, attempts=1, started=100, now=100, delay=0)


def test_queue_retry_after_is_the_time_to_drain_the_queue_ahead():
    assert queue_retry_after(queued=40, limit=8, hold_seconds=2) == 10
    assert queue_retry_after(queued=1, limit=8, hold_seconds=2) == 1  # at least a second
    assert queue_retry_after(queued=10, limit=0, hold_seconds=1) == 10  # no limit known: as if one


def test_moving_average():
    assert moving_average(1.0, 3.0) == pytest.approx(1.4)
    assert moving_average(1.0, 1.0) == 1.0
