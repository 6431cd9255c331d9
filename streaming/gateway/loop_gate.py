"""Running streams before new requests: a request under /v1/ waits at the door while the event loop lags.

One process's event loop carries every stream it relays. When requests arrive faster than the loop can admit them
(each costs ~3 ms of CPU: the key, the quota, the ledger row, the provider's request), every admission in flight
adds a step to each turn of the loop, the turns grow to 100–270 ms, and every running stream's next token waits
that long (measured: docs/performance.md, "Session 16"). The gate keeps the turns short instead: a timer measures
how late the loop runs it (its lag; every 10 ms, every 5 ms while requests wait, stopped after a second with no
request); while the lag is under the limit, a request goes straight through; once it is over, new requests queue
here, a queue per caller with the callers taking turns (LoopGate), and are let in one per timer tick while the loop
keeps up again — at least one every `min_interval` whatever the lag, so a loop that lags for another reason (a
machine short of CPU) still admits.

The price of that floor: a loop that lags for long for a reason of its own (a host with no core to spare) admits
one request every 25 ms, 40 a second, and the rest queue; sluice_loop_gate_waiting and the wait's total on /metrics
show it, and 0 turns the gate off.

What waits here has not been admitted: no quota, no ledger row, no provider request. A request that waits has its
client's own timeout; the time it waited shows in its time to first token. The gate is what Envoy's overload
manager and Node's toobusy do for a single-threaded server, with a queue instead of a 503: vLLM's scheduler makes
the same choice (running sequences first, new prompts after).

SLUICE_LOOP_GATE_MS (settings.LOOP_GATE_MS) is the lag limit, 25 ms by default (half the 50 ms that issue 20 allows a
token's added delay at the 99th percentile); 0 turns the gate off. /metrics shows sluice_loop_gate_waiting,
sluice_loop_gate_waited_total and sluice_loop_gate_wait_seconds_total.
"""

import asyncio
from collections import deque

from streaming.telemetry import metrics

DEFAULT_MAX_LAG_MS = 25.0
# The timer's period while requests wait: one let in every 5 ms at most while the loop keeps up, 200 a second, below
# the ~300 a second one core admits with nothing else to do. One every 2 ms (500 a second) let a burst of admissions
# in each time the loop caught up, whose steps then landed on it together: p99 added delay at 1,000 streams 63.1 /
# 60.1 / 48.7 ms against 34.7 / 33.6 / 35.0 with 5 ms (docs/performance.md, "Session 16").
TICK = 0.005
WATCH = 0.010  # its period while none waits: how late the loop runs is measured as well, for half the wake-ups
MIN_INTERVAL = 0.025  # at least one released this often, whatever the lag
IDLE_SECONDS = 1.0  # the timer stops after this long with nothing waiting and nothing arriving


class LoopGate:
    """The gate. Requests that wait are queued per caller (their Authorization header: nothing is looked up) and let
    in round-robin across callers, first come first served within one: a caller who sends a thousand requests at once
    waits behind their own, not in front of everybody else's."""

    def __init__(self, max_lag_ms: float = DEFAULT_MAX_LAG_MS, tick: float = TICK,
                 min_interval: float = MIN_INTERVAL, watch: float = WATCH):
        self.max_lag = max_lag_ms / 1000.0
        self.tick = tick
        self.watch = max(watch, tick)
        self.min_interval = min_interval
        self._loop = None
        self._queues = {}  # caller -> deque of futures; in the order the next turns go (round-robin)
        self._open = True
        self._due = None  # when the timer should run next (loop time); None: not running
        self._last_release = 0.0
        self._arrived = 0.0  # loop time of the last request
        # What a test or a benchmark reads: requests that waited, the longest wait.
        self.waited = 0
        self.longest_wait = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_lag > 0

    @property
    def open(self) -> bool:
        """The timer's last run was on time (within the limit): a request arriving now goes straight through, unless
        others wait already."""
        return self._open

    @property
    def queued(self) -> int:
        return sum(1 for queue in self._queues.values() for future in queue if not future.done())

    def passes(self) -> bool:
        """Whether a request arriving now may go on at once; if not, it waits with `wait`."""
        if not self.enabled:
            return True
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (a test's, a restarted server's): nothing carries over
            self._loop, self._queues, self._open, self._due = loop, {}, True, None
        self._arrived = loop.time()
        if self._due is None:
            self._schedule(loop, self.watch)
        return self._open and not self._queues

    def enter(self, caller: bytes = b""):
        """None if the request may go on at once, else an awaitable that completes when it may."""
        return None if self.passes() else self.wait(caller)

    async def wait(self, caller: bytes = b""):
        loop = self._loop
        future = loop.create_future()
        queue = self._queues.get(caller)
        if queue is None:
            queue = self._queues[caller] = deque()
        queue.append(future)
        queued = loop.time()
        self.waited += 1
        metrics.LOOP_GATE_WAITED.inc()
        metrics.LOOP_GATE_WAITING.inc()
        try:
            await future
        finally:
            if not future.done():  # cancelled while waiting: its turn is skipped
                future.cancel()
            waited = loop.time() - queued
            metrics.LOOP_GATE_WAITING.dec()
            metrics.LOOP_GATE_WAIT_SECONDS.inc(waited)
            self.longest_wait = max(self.longest_wait, waited)

    def _release_one(self) -> bool:
        """Let in the next caller's first request; that caller's queue goes to the back of the turns."""
        queues = self._queues
        while queues:
            caller = next(iter(queues))
            queue = queues.pop(caller)
            while queue and queue[0].done():  # cancelled while waiting
                queue.popleft()
            if not queue:
                continue
            queue.popleft().set_result(None)
            while queue and queue[0].done():
                queue.popleft()
            if queue:
                queues[caller] = queue
            return True
        return False

    def _schedule(self, loop, period):
        self._due = loop.time() + period
        loop.call_at(self._due, self._on_tick)

    def _on_tick(self):
        loop = self._loop
        now = loop.time()
        self._open = now - self._due <= self.max_lag
        if self._queues:
            if (self._open or now - self._last_release >= self.min_interval) and self._release_one():
                self._last_release = now
        elif self._open and now - self._arrived >= IDLE_SECONDS:
            self._due = None  # the next request starts it again
            return
        self._schedule(loop, self.tick if self._queues else self.watch)


def from_settings() -> LoopGate:
    from django.conf import settings

    return LoopGate(getattr(settings, "LOOP_GATE_MS", DEFAULT_MAX_LAG_MS))
