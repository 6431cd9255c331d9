"""The counter store's contract. Every backend passes tests/quotas/test_store.py.

All operations are atomic: each is one Lua script in Redis, one critical section in memory.
Times are Unix seconds (floats) passed in by the caller, so tests control the clock.
Leases and slots are hash fields with an expiry stamp, renewed by a heartbeat: a worker that
crashes stops renewing, and what it held frees itself within the TTL.
"""

from dataclasses import dataclass


class StoreUnavailable(Exception):
    """The store could not be reached; callers apply the fail-open/closed setting of each limit."""


@dataclass(frozen=True)
class RateResult:
    allowed: bool
    remaining: int
    reset_seconds: float  # until the oldest counted request leaves the window


@dataclass(frozen=True)
class SlotResult:
    acquired: bool
    active: int  # slots held after the call, this one included if acquired


@dataclass(frozen=True)
class WindowSpec:
    key: str
    limit: int
    expire_at: float  # when the whole window's record may be dropped (its end, plus a margin)


@dataclass(frozen=True)
class LeaseResult:
    granted: int
    missing: tuple = ()  # keys of windows that must be seeded from the ledger first; nothing granted
    remaining: tuple = ()  # per window, after the grant: limit - used - all leases


class CounterStore:
    # True when instances hold connections tied to one event loop.
    per_event_loop = False

    async def hit(self, key: str, limit: int, window_seconds: float, now: float) -> RateResult:
        """Count one request in a sliding window of `window_seconds` unless `limit` are already in it.

        A refused request is not counted. The key expires with the window.
        """
        raise NotImplementedError

    async def peek_rate(self, key: str, limit: int, window_seconds: float, now: float) -> RateResult:
        """What `hit` would report, without counting anything."""
        raise NotImplementedError

    async def acquire_slot(self, key: str, holder: str, limit: int, ttl: float, now: float) -> SlotResult:
        """Take a concurrency slot for `holder` unless `limit` unexpired slots are held.

        Expired slots (not renewed within `ttl`) are dropped first. Idempotent for one holder.
        """
        raise NotImplementedError

    async def release_slot(self, key: str, holder: str) -> None:
        """Give the slot back; releasing a slot that is not held does nothing."""
        raise NotImplementedError

    async def lease(self, windows: list[WindowSpec], holder: str, held: int, want: int, now: float,
                    ttl: float) -> LeaseResult:
        """Grant up to `want` more tokens to `holder`, who holds `held` already, in every window at once.

        Grants min(want, what every window has left) — possibly 0 — and records the holder's lease
        as `held + granted` (an absolute value, so a window rebuilt with a placeholder for this
        holder is corrected, never counted twice). If any window's record is missing, grants
        nothing and names the missing keys: seed them from the ledger, then call again.
        """
        raise NotImplementedError

    async def renew(self, windows: list[WindowSpec], slot_key: str | None, holder: str, now: float,
                    ttl: float) -> None:
        """Heartbeat: push back the expiry of the holder's leases and slot."""
        raise NotImplementedError

    async def settle(self, windows: list[WindowSpec], holder: str, charged: int) -> None:
        """Turn the holder's lease into `charged` used tokens, in every window.

        Only where the holder still has a lease: a window rebuilt from a ledger that already holds
        this request's final row must not count it twice. Missing windows are left missing.
        """
        raise NotImplementedError

    async def seed(self, window: WindowSpec, used: int, leases: dict[str, int], now: float, ttl: float) -> None:
        """Create a missing window record from the ledger; if it exists meanwhile, leave it alone."""
        raise NotImplementedError

    async def usage(self, key: str, now: float) -> tuple[int, int] | None:
        """(used, leased) of a window, or None if its record is missing."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Drop a record (an operator's reset of a window; slots)."""
        raise NotImplementedError
