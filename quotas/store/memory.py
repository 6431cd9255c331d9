"""The in-process store: the embedded default for one server process.

Every operation runs without awaiting inside a lock-free critical section on the event loop; a
threading lock also covers callers from sync code (the admin runs in threads).
"""

import bisect
import threading
import time

from .base import CounterStore, LeaseResult, RateResult, SlotResult


class MemoryStore(CounterStore):
    def __init__(self):
        self._lock = threading.Lock()
        self._rates: dict[str, list[float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        # window key -> {"used": int, "leases": {holder: [tokens, expires]}, "expire_at": float}
        self._windows: dict[str, dict] = {}

    def _window(self, key):
        record = self._windows.get(key)
        if record is not None and record["expire_at"] <= time.time():
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
        if allowed and count:
            stamps.append(now)
        reset = (stamps[0] + window_seconds - now) if stamps else 0.0
        return RateResult(allowed, max(0, limit - len(stamps)), max(0.0, reset))

    async def acquire_slot(self, key, holder, limit, ttl, now):
        with self._lock:
            slots = self._slots.setdefault(key, {})
            for other, expires in list(slots.items()):
                if expires <= now:
                    del slots[other]
            if holder in slots or len(slots) < limit:
                slots[holder] = now + ttl
                return SlotResult(True, len(slots))
            return SlotResult(False, len(slots))

    async def release_slot(self, key, holder):
        with self._lock:
            self._slots.get(key, {}).pop(holder, None)

    async def lease(self, windows, holder, held, want, now, ttl):
        with self._lock:
            records = [self._window(w.key) for w in windows]
            missing = tuple(w.key for w, r in zip(windows, records) if r is None)
            if missing:
                return LeaseResult(0, missing=missing)
            available = []
            for window, record in zip(windows, records):
                leases = record["leases"]
                for other, (_, expires) in list(leases.items()):
                    if expires <= now:
                        del leases[other]
                others = sum(t for h, (t, _) in leases.items() if h != holder)
                available.append(window.limit - record["used"] - others - held)
            granted = max(0, min(want, *available))
            for window, record in zip(windows, records):
                record["leases"][holder] = [held + granted, now + ttl]
                record["expire_at"] = max(record["expire_at"], window.expire_at)
            return LeaseResult(granted, remaining=tuple(max(0, a - granted) for a in available))

    async def renew(self, windows, slot_key, holder, now, ttl):
        with self._lock:
            for window in windows:
                record = self._window(window.key)
                if record is not None and holder in record["leases"]:
                    record["leases"][holder][1] = now + ttl
            if slot_key is not None and holder in self._slots.get(slot_key, {}):
                self._slots[slot_key][holder] = now + ttl

    async def settle(self, windows, holder, charged):
        with self._lock:
            for window in windows:
                record = self._window(window.key)
                if record is not None and record["leases"].pop(holder, None) is not None:
                    record["used"] += charged

    async def seed(self, window, used, leases, now, ttl):
        with self._lock:
            if self._window(window.key) is None:
                self._windows[window.key] = {
                    "used": used,
                    "leases": {holder: [tokens, now + ttl] for holder, tokens in leases.items()},
                    "expire_at": window.expire_at,
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
            self._rates.pop(key, None)
