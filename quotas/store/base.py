"""The counter store's contract. Every backend passes tests/quotas/store/test_store.py.

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
    member: str | None = None  # the counted request's entry, for `unhit` (None: nothing was counted)


@dataclass(frozen=True)
class SlotResult:
    acquired: bool
    active: int  # slots held after the call, this one included if acquired


@dataclass(frozen=True)
class WindowSpec:
    key: str
    limit: int
    expire_at: float  # when the whole window's record may be dropped (its end, plus a margin)
    # The window's units per token of this lease: 1 for a token window; for a money window, the nanos a token costs
    # at the rate of what is leased (the prompt's input rate at admission, the output rate while streaming).
    rate: int = 1


def per_window(value, windows) -> tuple:
    """`held` or `charged`: one number for every window, or one per window (in each window's units)."""
    if isinstance(value, int):
        return tuple(value * w.rate for w in windows) if any(w.rate != 1 for w in windows) else (value,) * len(
            windows)
    return tuple(value)


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

    async def unhit(self, key: str, member: str) -> None:
        """Take back one request `hit` counted (its result's `member`): a request refused afterwards for another
        limit does not spend the rate. Taking back one that has left the window, or twice, does nothing."""
        raise NotImplementedError

    async def acquire_slot(self, key: str, holder: str, limit: int, ttl: float, now: float) -> SlotResult:
        """Take a concurrency slot for `holder` unless `limit` unexpired slots are held.

        Expired slots (not renewed within `ttl`) are dropped first. Idempotent for one holder.
        """
        raise NotImplementedError

    async def release_slot(self, key: str, holder: str) -> None:
        """Give the slot back; releasing a slot that is not held does nothing."""
        raise NotImplementedError

    async def lease(self, windows: list[WindowSpec], holder: str, held, want: int, now: float,
                    ttl: float) -> LeaseResult:
        """Grant up to `want` more tokens to `holder`, who holds `held` already, in every window at once.

        Grants min(want, what every window has left) — possibly 0 — and records the holder's lease
        as `held + granted` (an absolute value, so a window rebuilt with a placeholder for this
        holder is corrected, never counted twice). If any window's record is missing, grants
        nothing and names the missing keys: seed them from the ledger, then call again.

        Weighted windows (`WindowSpec.rate` ≠ 1, money): a window with `left` units has room for left // rate
        tokens, and a grant takes granted × rate of its units; `held` is then one amount per window, in its units
        (a number alone: that many tokens at each window's rate). `remaining` is in each window's units.
        """
        raise NotImplementedError

    async def renew(self, windows: list[WindowSpec], slot_key: str | None, holder: str, now: float,
                    ttl: float) -> bool:
        """Heartbeat: push back the expiry of the holder's leases and slot. True if every window still held the
        holder's lease (its own, or a rebuild's placeholder for it); False if any had lost it (a record dropped
        and rebuilt, or missing: nothing is created). The admission's check after the ledger row's insert
        (TokenLease.confirm) relies on it."""
        raise NotImplementedError

    async def settle(self, windows: list[WindowSpec], holder: str, charged) -> None:
        """Turn the holder's lease into `charged` used tokens, in every window (or, as for `held`, one amount per
        window in its units: a money window is charged the request's cost).

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

    # The shared upstream limit and circuit breaker (streaming/provider/, docs/resilience.md) -----------------
    # One record per upstream, holding its adaptive (AIMD) limit, its permits (holder -> expiry and user, like
    # slots), its breaker (the run of failures, open-until, the half-open probe's holder), and per user: when it
    # last contended (its recent demand, whether it waits), its own breaker, its failures in the current run.

    async def acquire_permit(self, key: str, holder: str, policy: "PermitPolicy", now: float, user: str = "",
                             waiting: tuple = ()) -> "PermitResult":
        """Take a permit to call the upstream for `user`, unless a breaker is open or no permit is free to them.

        OPEN (`own=True`) while the user's own breaker cools down (see `release_permit`). OPEN while the shared
        breaker cools down (retry_after_seconds: until it ends), and while it is half-open and another holder's
        probe is running; once the cooldown is over the first caller gets the permit as the one probe
        (`probe=True`). FULL when floor(limit) unexpired permits are held (expired ones are dropped first);
        `policy.max_limit == 0` means no limit (nothing is counted: `active` is then 1). The limit starts at
        `policy.max_limit`. Idempotent for one holder (it renews the expiry). Atomic.

        Fair shares (`policy.fair_share`, with a limit): the users *contending* are those holding a permit, and
        those that were granted, refused or gave back one within `policy.demand_seconds`; each one's share is
        max(1, floor(floor(limit) / contending)). A user holding its share or more gets a free permit only if more
        are free than the other contending users lack of their shares — a user that waits lacks its whole share,
        any other only up to the most it held at once recently (its demand) — else FULL with `over_share=True`.
        A refused user is marked waiting for `demand_seconds`, and so is every user in `waiting` (those queued in
        the caller's process); a user granted a permit is no longer marked waiting.
        """
        raise NotImplementedError

    async def release_permit(self, key: str, holder: str, outcome: str, limit_seen: float, policy: "PermitPolicy",
                             now: float, keep: bool = False, user: str = "") -> float:
        """Give the permit back (unless `keep`) and record the attempt's outcome for `user`; returns the new limit.

        OK: limit += increase / limit, up to max_limit. THROTTLED (the upstream said 429): the limit becomes
        min(limit, limit_seen × decrease_factor), at least min_limit — so the 429s of requests admitted under
        one limit cut it once, not once each. Shared breaker, while closed: OK and THROTTLED reset the run of
        failures, FAILED counts one — but no more than ceil(breaker_threshold / breaker_min_users) of one run's
        failures count per user, so that one user's failures alone cannot open it — and the breaker opens for the
        cooldown at `breaker_threshold` counted; while open or half-open only the probe's outcome counts: OK or
        THROTTLED close it (and the probe's user's own breaker), FAILED reopens it, NONE lets another request
        probe. The user's own breaker, when one user's failures cannot open the shared one (fewer count than the
        threshold) and while the shared one is closed: `breaker_threshold` FAILED of this user in a row (none of
        its OK or THROTTLED in between) open it for the cooldown, for this user only; after it, one more FAILED
        reopens it, an OK or THROTTLED closes it. NONE changes nothing else. With fair shares the user counts as contending for
        `demand_seconds` more. Atomic; releasing a permit not held is harmless.
        """
        raise NotImplementedError

    async def renew_permit(self, key: str, holder: str, ttl: float, now: float) -> bool:
        """Heartbeat: push back the expiry of the holder's permit (and probe). False if it is not held."""
        raise NotImplementedError

    async def permit_excess(self, key: str, policy: "PermitPolicy", now: float) -> dict:
        """{user: permits held beyond its fair share} for the users above it while another user waits below its
        share (shares as in `acquire_permit`); empty when nobody waits so, or without fair shares or a limit.
        Reads only."""
        raise NotImplementedError

    async def upstream_states(self, keys: list[str], now: float) -> dict:
        """{key: UpstreamState} for the upstream records that exist among `keys` (the dashboard's health table; a
        missing record is an upstream nobody called lately: its limit at the maximum, its breaker closed). Reads
        only."""
        raise NotImplementedError


PERMIT_ACQUIRED, PERMIT_FULL, PERMIT_OPEN = "acquired", "full", "open"
OUTCOME_OK, OUTCOME_THROTTLED, OUTCOME_FAILED, OUTCOME_NONE = "ok", "throttled", "failed", "none"
# Retry-After while a half-open breaker's probe is running.
PROBE_RETRY_SECONDS = 1.0
# The limit and breaker of an upstream nobody called for this long are forgotten (the limit restarts at its max).
UPSTREAM_STATE_SECONDS = 3600.0


@dataclass(frozen=True)
class PermitPolicy:
    """The UPSTREAM_* settings the permit operations need, passed in so that tests choose them."""

    min_limit: int
    max_limit: int  # 0: no limit (permits are still recorded, the breaker still applies)
    increase: float  # per success, divided by the limit: about +increase per round of `limit` successes
    decrease_factor: float  # the share of the limit left after a 429
    breaker_threshold: int  # consecutive failures that open the breaker; 0: it never opens
    breaker_cooldown_seconds: float
    ttl_seconds: float  # a permit not renewed (or released) within this frees itself
    # Fairness between users (docs/resilience.md, "Fairness"); the defaults are the rules without users.
    fair_share: bool = False  # per-user fair shares of the limit (acquire_permit)
    demand_seconds: float = 2.0  # how long a user's recent use, request or wait keeps it contending
    breaker_min_users: int = 1  # the shared breaker opens only on failures of at least this many users

    @property
    def state_seconds(self) -> float:
        return max(UPSTREAM_STATE_SECONDS, self.ttl_seconds, self.breaker_cooldown_seconds)

    @property
    def user_failures_counted(self) -> int:
        """How many of one run's failures count per user towards the shared breaker's threshold."""
        return -(-self.breaker_threshold // max(1, self.breaker_min_users))


@dataclass(frozen=True)
class UpstreamState:
    """An upstream record as the dashboard reads it."""

    limit: float | None  # as stored (the policy's bounds apply); None: not stored yet (the maximum)
    open_until: float  # 0: the breaker is closed; past: half-open (the next request probes); future: open
    permits: int  # unexpired permits held: requests in flight to it


@dataclass(frozen=True)
class PermitResult:
    status: str  # PERMIT_ACQUIRED, PERMIT_FULL or PERMIT_OPEN
    limit: float  # the upstream's limit when the call ran (0: no limit)
    active: int  # permits held after the call
    retry_after_seconds: float = 0.0  # PERMIT_OPEN: until the breaker may let a request through
    probe: bool = False  # acquired as the half-open breaker's one probe
    over_share: bool = False  # PERMIT_FULL for this user only: it holds its fair share, others contend
    own: bool = False  # PERMIT_OPEN by the user's own breaker, not the shared one
