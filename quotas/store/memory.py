"""The in-process store: the embedded default for one server process.

Every operation runs without awaiting inside a lock-free critical section on the event loop; a
threading lock also covers callers from sync code (the admin runs in threads).
"""

import bisect
import threading
import time

from .base import CounterStore, LeaseResult, RateResult, SlotResult, per_window
from .base import (OUTCOME_FAILED, OUTCOME_OK, OUTCOME_THROTTLED, PERMIT_ACQUIRED, PERMIT_FULL, PERMIT_OPEN,
                   PROBE_RETRY_SECONDS, PermitResult, UpstreamState)


class MemoryStore(CounterStore):
    def __init__(self):
        self._lock = threading.Lock()
        self._rates: dict[str, list[float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._slot_expiry: dict[str, float] = {}  # key -> a bound no later than its slots' soonest expiry
        # window key -> {"used": int, "leases": {holder: [tokens, expires]}, "expire_at": float,
        #                "held": int (the leases' tokens summed), "next_expiry": float (≤ the soonest lease expiry)}
        self._windows: dict[str, dict] = {}

    def _window(self, key, clock=None):
        record = self._windows.get(key)
        if record is not None and record["expire_at"] <= (time.time() if clock is None else clock):
            del self._windows[key]
            return None
        return record

    async def hit(self, key, limit, window_seconds, now):
        with self._lock:
            return self._rate(key, limit, window_seconds, now, count=True)

    async def peek_rate(self, key, limit, window_seconds, now):
        with self._lock:
            return self._rate(key, limit, window_seconds, now, count=False)

    def _rate(self, key, limit, window_seconds, now, count):
        stamps = self._rates.setdefault(key, [])
        del stamps[: bisect.bisect_right(stamps, now - window_seconds)]
        allowed = len(stamps) < limit
        member = None
        if allowed and count:
            bisect.insort(stamps, now)
            member = repr(now)
        reset = (stamps[0] + window_seconds - now) if stamps else 0.0
        return RateResult(allowed, max(0, limit - len(stamps)), max(0.0, reset), member)

    async def unhit(self, key, member):
        with self._lock:
            stamps = self._rates.get(key, [])
            index = bisect.bisect_left(stamps, float(member))
            if index < len(stamps) and stamps[index] == float(member):
                del stamps[index]

    async def acquire_slot(self, key, holder, limit, ttl, now):
        with self._lock:
            slots = self._slots.setdefault(key, {})
            # The expired slots are dropped, walking the key's slots only once one may have expired (`_slot_expiry`:
            # never later than the soonest expiry; renewals only push expiries back). A walk on every acquisition cost
            # O(slots) each: 1,000 streams of one user starting at once, O(n²).
            if now >= self._slot_expiry.get(key, 0.0):
                soonest = float("inf")
                for other, expires in list(slots.items()):
                    if expires <= now:
                        del slots[other]
                    elif expires < soonest:
                        soonest = expires
                self._slot_expiry[key] = soonest
            if holder in slots or len(slots) < limit:
                slots[holder] = now + ttl
                self._slot_expiry[key] = min(self._slot_expiry[key], now + ttl)
                return SlotResult(True, len(slots))
            return SlotResult(False, len(slots))

    async def release_slot(self, key, holder):
        with self._lock:
            self._slots.get(key, {}).pop(holder, None)

    async def lease(self, windows, holder, held, want, now, ttl):
        held = per_window(held, windows)
        with self._lock:
            clock = time.time()  # once for every window: a team key's request leases 10
            records = [self._window(w.key, clock) for w in windows]
            missing = tuple(w.key for w, r in zip(windows, records) if r is None)
            if missing:
                return LeaseResult(0, missing=missing)
            available = []
            for window, record, mine in zip(windows, records, held):
                available.append(window.limit - record["used"] - self._others(record, holder, now) - mine)
            granted = max(0, min(want, *(a // w.rate for a, w in zip(available, windows))))
            for window, record, mine in zip(windows, records, held):
                leases, tokens = record["leases"], mine + granted * window.rate
                previous = leases.get(holder)
                record["held"] += tokens - (previous[0] if previous is not None else 0)
                leases[holder] = [tokens, now + ttl]
                record["next_expiry"] = min(record["next_expiry"], now + ttl)
                record["expire_at"] = max(record["expire_at"], window.expire_at)
            return LeaseResult(granted, remaining=tuple(max(0, a - granted * w.rate)
                                                        for a, w in zip(available, windows)))

    @staticmethod
    def _others(record, holder, now):
        """What the other holders' leases hold, the expired ones dropped first. The sum is kept as leases change
        (`held`); the leases are walked only once one may have expired (`next_expiry`, never later than the soonest
        expiry: renewals only push expiries back), to drop the expired ones and find the next. A walk on every lease
        made a window's leases cost O(holders) each: with 1,000 streams of one user, a tenth of the process's CPU
        (docs/performance.md, "Session 14")."""
        leases = record["leases"]
        if now >= record["next_expiry"]:
            held, soonest = 0, float("inf")
            for other, (tokens, expires) in list(leases.items()):
                if expires <= now:
                    del leases[other]
                else:
                    held += tokens
                    soonest = min(soonest, expires)
            record["held"], record["next_expiry"] = held, soonest
        own = leases.get(holder)
        return record["held"] - (own[0] if own is not None else 0)

    async def renew(self, windows, slot_key, holder, now, ttl):
        held = True
        with self._lock:
            for window in windows:
                record = self._window(window.key)
                if record is not None and holder in record["leases"]:
                    record["leases"][holder][1] = now + ttl
                else:
                    held = False
            if slot_key is not None and holder in self._slots.get(slot_key, {}):
                self._slots[slot_key][holder] = now + ttl
                self._slot_expiry[slot_key] = min(self._slot_expiry.get(slot_key, 0.0), now + ttl)
        return held

    async def settle(self, windows, holder, charged):
        with self._lock:
            clock = time.time()
            for window, amount in zip(windows, per_window(charged, windows)):
                record = self._window(window.key, clock)
                lease = None if record is None else record["leases"].pop(holder, None)
                if lease is not None:
                    record["held"] -= lease[0]
                    record["used"] += amount

    async def seed(self, window, used, leases, now, ttl):
        with self._lock:
            if self._window(window.key) is None:
                self._windows[window.key] = {
                    "used": used,
                    "leases": {holder: [tokens, now + ttl] for holder, tokens in leases.items()},
                    "expire_at": window.expire_at,
                    "held": sum(leases.values()),
                    "next_expiry": now + ttl,
                }

    async def usage(self, key, now):
        with self._lock:
            record = self._window(key)
            if record is None:
                return None
            leased = sum(t for t, expires in record["leases"].values() if expires > now)
            return record["used"], leased

    async def delete(self, key):
        with self._lock:
            self._windows.pop(key, None)
            self._slots.pop(key, None)
            self._slot_expiry.pop(key, None)
            self._rates.pop(key, None)

    # The shared upstream limit and circuit breaker (see the contract in base.py) ----------------------------

    def _upstream(self, key, policy):
        # {"limit": float, "fails": int, "open_until": float, "probe": (holder, expires) | None,
        #  "permits": {holder: expires}, "owners": {holder: user}, "users": {user: [until, demand, wait_until]},
        #  "breakers": {user: [fails, open_until]}, "run": int, "runs": {user: [run, failures]}}
        # Created on first use: the permit operations were added after __init__'s counters.
        upstreams = self.__dict__.setdefault("_upstreams", {})
        record = upstreams.get(key)
        if record is None:
            record = upstreams[key] = {"limit": float(policy.max_limit), "fails": 0, "open_until": 0.0,
                                       "probe": None, "permits": {}, "owners": {}, "users": {}, "breakers": {},
                                       "run": 0, "runs": {}}
        return record

    @staticmethod
    def _holdings(record, now):
        """Permits held per user, after dropping expired permits and users no longer contending."""
        permits, owners, users = record["permits"], record["owners"], record["users"]
        for holder, expires in list(permits.items()):
            if expires <= now:
                del permits[holder]
                owners.pop(holder, None)
        for user, (until, _, _) in list(users.items()):
            if until <= now:
                del users[user]
        held = {}
        for holder in permits:
            owner = owners.get(holder, "")
            held[owner] = held.get(owner, 0) + 1
        return held

    @staticmethod
    def _share(limit, held, users, also=()):
        contending = set(held) | set(users) | set(also)
        return max(1, int(limit) // max(1, len(contending))), contending

    @staticmethod
    def _contend(record, user, now, policy, demand=0, waiting=None):
        """Note that `user` contends: its recent demand (the most it held at once), and whether it waits."""
        until, old_demand, wait_until = record["users"].get(user, (0.0, 0, 0.0))
        if until <= now:
            old_demand, wait_until = 0, 0.0
        if waiting is not None:
            wait_until = now + policy.demand_seconds if waiting else 0.0
        record["users"][user] = [now + policy.demand_seconds, max(old_demand, demand), wait_until]

    def _yields(self, record, user, held, limit, now):
        """Whether `user`, at or above its fair share, must leave the free permits to the other contenders."""
        users = record["users"]
        share, contending = self._share(limit, held, users, (user,))
        if held.get(user, 0) < share:
            return False
        lacking = 0
        for other in contending - {user}:
            _, demand, wait_until = users.get(other, (0.0, 0, 0.0))
            wants = share if wait_until > now else min(share, demand)
            lacking += max(0, wants - held.get(other, 0))
        return int(limit) - sum(held.values()) <= lacking

    async def acquire_permit(self, key, holder, policy, now, user="", waiting=()):
        with self._lock:
            record = self._upstream(key, policy)
            user = str(user)
            own = record["breakers"].get(user)
            if own and own[1] > now:
                return PermitResult(PERMIT_OPEN, 0.0, 0, own[1] - now, own=True)
            probe = False
            if record["open_until"]:
                if now < record["open_until"]:
                    return PermitResult(PERMIT_OPEN, 0.0, 0, record["open_until"] - now)
                running = record["probe"]
                if running and running[0] != holder and running[1] > now:
                    return PermitResult(PERMIT_OPEN, 0.0, 0, PROBE_RETRY_SECONDS)
                probe = True
            limit = record["limit"]
            if policy.max_limit:
                limit = max(policy.min_limit, min(policy.max_limit, limit))
            permits = record["permits"]
            if not policy.max_limit:  # nothing to count (as in Redis: no O(streams) scan per request)
                permits[holder] = now + policy.ttl_seconds
                record["owners"][holder] = user
                if probe:
                    record["probe"] = (holder, now + policy.ttl_seconds)
                return PermitResult(PERMIT_ACQUIRED, limit, 1, probe=probe)
            held = self._holdings(record, now)
            fair = policy.fair_share
            if fair:
                for other in waiting:
                    self._contend(record, str(other), now, policy, waiting=True)
            others = len(permits) - (holder in permits)
            if holder not in permits:
                over_share = others < int(limit) and fair and self._yields(record, user, held, limit, now)
                if others >= int(limit) or over_share:
                    if fair:
                        self._contend(record, user, now, policy, held.get(user, 0) + 1, waiting=True)
                    return PermitResult(PERMIT_FULL, limit, others, over_share=over_share)
                held[user] = held.get(user, 0) + 1
            permits[holder] = now + policy.ttl_seconds
            record["owners"][holder] = user
            if fair:
                self._contend(record, user, now, policy, held[user], waiting=False)
            if probe:
                record["probe"] = (holder, now + policy.ttl_seconds)
            return PermitResult(PERMIT_ACQUIRED, limit, others + 1, probe=probe)

    async def release_permit(self, key, holder, outcome, limit_seen, policy, now, keep=False, user=""):
        with self._lock:
            record = self._upstream(key, policy)
            user = str(user)
            if not keep:
                record["permits"].pop(holder, None)
                record["owners"].pop(holder, None)
            limit = record["limit"]
            if policy.max_limit:
                if outcome == OUTCOME_OK:
                    limit = min(policy.max_limit, limit + policy.increase / max(limit, 1.0))
                elif outcome == OUTCOME_THROTTLED:
                    limit = max(policy.min_limit, min(limit, limit_seen * policy.decrease_factor))
                record["limit"] = limit
                if policy.fair_share:
                    self._contend(record, user, now, policy)
            running = record["probe"]
            if record["open_until"]:
                if running and running[0] == holder and now >= record["open_until"]:
                    record["probe"] = None
                    if outcome in (OUTCOME_OK, OUTCOME_THROTTLED):
                        record["open_until"], record["fails"] = 0.0, 0
                        record["breakers"].pop(user, None)
                    elif outcome == OUTCOME_FAILED:
                        record["open_until"] = now + policy.breaker_cooldown_seconds
            elif outcome in (OUTCOME_OK, OUTCOME_THROTTLED):
                if record["fails"]:
                    record["fails"] = 0
                    record["run"] += 1  # a new run: every user's failures in it start from 0
                record["breakers"].pop(user, None)
            elif outcome == OUTCOME_FAILED and policy.breaker_threshold:
                threshold = policy.breaker_threshold
                if policy.user_failures_counted < threshold:
                    # The user's own breaker (one user cannot open the shared one); after its cooldown one failure
                    # reopens it.
                    fails, open_until = record["breakers"].get(user, (0, 0.0))
                    fails += 1
                    if fails >= threshold:
                        fails, open_until = threshold - 1, now + policy.breaker_cooldown_seconds
                    record["breakers"][user] = [fails, open_until]
                run, counted = record["runs"].get(user, (record["run"], 0))
                counted = counted + 1 if run == record["run"] else 1
                record["runs"][user] = [record["run"], counted]
                if counted <= policy.user_failures_counted:
                    record["fails"] += 1
                    if record["fails"] >= threshold:
                        record["open_until"], record["fails"] = now + policy.breaker_cooldown_seconds, 0
                        record["run"] += 1
            return limit

    async def renew_permit(self, key, holder, ttl, now):
        with self._lock:
            record = self.__dict__.get("_upstreams", {}).get(key)
            if record is None or holder not in record["permits"]:
                return False
            record["permits"][holder] = now + ttl
            if record["probe"] and record["probe"][0] == holder:
                record["probe"] = (holder, now + ttl)
            return True

    async def permit_excess(self, key, policy, now):
        with self._lock:
            record = self.__dict__.get("_upstreams", {}).get(key)
            if record is None or not policy.fair_share or not policy.max_limit:
                return {}
            limit = max(policy.min_limit, min(policy.max_limit, record["limit"]))
            held = self._holdings(record, now)
            users = record["users"]
            share, _ = self._share(limit, held, users)
            waiting = {user for user, (_, _, wait_until) in users.items()
                       if wait_until > now and held.get(user, 0) < share}
            return {user: n - share for user, n in held.items() if n > share and waiting - {user}}

    async def upstream_states(self, keys, now):
        with self._lock:
            records = self.__dict__.get("_upstreams", {})
            return {key: UpstreamState(record["limit"], record["open_until"],
                                       sum(1 for expires in record["permits"].values() if expires > now))
                    for key in keys if (record := records.get(key)) is not None}
