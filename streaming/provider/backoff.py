"""Retry and queue arithmetic for the upstream: pure functions of plain values, `now` and randomness passed in.

retries.py and permits.py apply them; docs/resilience.md states the policy. Tested in tests/streaming/provider/test_backoff.py.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    deadline_seconds: float  # no retry starts (or is slept towards) later than this after the first attempt
    max_attempts: int  # attempts in all, the first included
    base_seconds: float  # the first retry waits up to this
    max_backoff_seconds: float  # no wait is longer (except a provider's Retry-After, up to its own cap)
    retry_after_cap_seconds: float  # the most of a provider's Retry-After that is honoured

    @property
    def enabled(self) -> bool:
        return self.deadline_seconds > 0 and self.max_attempts > 1


def backoff_ceiling(policy: RetryPolicy, retry: int) -> float:
    """The exponential ceiling of the `retry`-th retry (1-based): base × 2^(retry-1), capped."""
    return min(policy.max_backoff_seconds, policy.base_seconds * 2 ** min(retry - 1, 30))


def retry_delay(policy: RetryPolicy, retry: int, retry_after_seconds: float | None, unit: float) -> float:
    """Seconds to wait before the `retry`-th retry; `unit` is a uniform random number in [0, 1).

    Full jitter (uniform between 0 and the exponential ceiling) spreads the retries of many clients that
    failed together; a provider's Retry-After, capped, is a floor: never sooner than it asked.
    """
    delay = unit * backoff_ceiling(policy, retry)
    if retry_after_seconds is not None:
        delay = max(delay, min(max(0.0, retry_after_seconds), policy.retry_after_cap_seconds))
    return delay


def may_retry(policy: RetryPolicy, attempts: int, started: float, now: float, delay: float) -> bool:
    """Whether one more attempt may follow `attempts` made so far, after sleeping `delay` from `now`."""
    return attempts < policy.max_attempts and now + delay < started + policy.deadline_seconds


def queue_retry_after(queued: int, limit: float, hold_seconds: float) -> float:
    """What to tell a client refused by a full queue: the time for the queue ahead of it to drain.

    `queued` requests wait for `limit` permits that are each held about `hold_seconds`; at least 1 s.
    """
    return max(1.0, queued * hold_seconds / max(1.0, limit))


def moving_average(previous: float, sample: float, weight: float = 0.2) -> float:
    """Exponentially weighted: how long permits are held, as the queue's Retry-After needs it."""
    return previous + weight * (sample - previous)


def demand_seconds(poll_seconds: float) -> float:
    """How long a user stays contending for fair shares after it last took, gave back or waited for a permit.

    Long enough to span a closed-loop client's turn-around (the next request follows the last within
    milliseconds) and three of the queue's polls (a waiting user is re-announced once per third of it).
    """
    return max(2.0, 3 * poll_seconds)


def preempt_tick(after_seconds: float) -> float:
    """How often a process looks for streams stalled `after_seconds` (a quarter of it, from 0.05 s to 1 s)."""
    return min(1.0, max(0.05, after_seconds / 4))
