"""A stream's timers: the stalled-client cut-off, the provider's first-token and idle timeouts, the maximum
duration, and the heartbeat that keeps the stream's lease and slot alive.

No timer is armed per read or per write, and none per stream (docs/performance.md, "One ticker for every stream"):
one task per event loop and tick length (`_Ticker`) looks at every running stream's relay timestamps once a tick
(at most a second, a quarter of the shortest timeout it enforces): one sleeping task, one timer and one wake-up a
tick for the whole process, instead of one of each for every stream. A check is plain code; what it finds due (a
heartbeat's renewal of the lease, a stream to end) runs as a task of its own, one at a time for a stream, and a
failure there is logged and ends no other stream's watch.
"""

import asyncio
import contextvars
import logging
import time

from streaming.errors import ApiError

logger = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, relay, *, heartbeat, on_stall, settings):
        self.relay = relay
        self.request_id = relay.request_id
        # Called every tick (the lifecycle's lease renewal and ledger row progress); what it returns, if not None,
        # is awaited — in a task of its own, so that the tick does not wait for one stream's store or database.
        self.heartbeat = heartbeat
        self.on_stall = on_stall  # awaited when the client stalled, once its handler is cancelled
        self.settings = settings
        self._handler = None
        self._ticker = None
        self._action = None  # the task running what the last check found due

    def start(self, handler: asyncio.Task):
        """Watch the relay whose response `handler` (the task writing it) sends."""
        self._handler = handler
        self._ticker = _ticker(self.tick_seconds())
        self._ticker.add(self)

    def stop(self):
        if self._ticker is not None:
            self._ticker.discard(self)
            self._ticker = None
        action = self._action
        if action is not None and action is not asyncio.current_task():
            action.cancel()
        # Nothing is checked any more: let go of the relay, its handler and the lifecycle's callbacks, each of which
        # leads back here (the relay holds this watchdog). A finished stream is then freed when its last reference
        # goes, not when the cyclic collector next reaches its generation (docs/performance.md, "Session 13").
        self.relay = self._handler = self.heartbeat = self.on_stall = None

    def tick_seconds(self) -> float:
        s = self.settings
        return max(0.05, min(1.0, s.STREAM_STALL_TIMEOUT / 4, s.QUOTA_SLOT_TTL / 3, s.UPSTREAM_IDLE_TIMEOUT / 4))

    def check(self, now):
        """One tick: the heartbeat, then the timers. Plain code; what is due runs in `_act`'s task."""
        if self._ticker is None or self._action is not None:  # stopped, or the last tick's action still runs
            return
        try:
            beat = self.heartbeat()
        except Exception:  # logged; the timers below are checked all the same
            logger.exception("heartbeat failed for %s", self.request_id)
            beat = None
        ending = self._ending(now)
        if beat is not None or ending is not None:
            self._action = action = asyncio.ensure_future(self._act(beat, ending))
            action.add_done_callback(self._acted)

    def _ending(self, now):
        """The coroutine that ends the stream, if one of its timers ran out (None otherwise)."""
        relay, s = self.relay, self.settings
        if relay.yield_started is not None and now - relay.yield_started > s.STREAM_STALL_TIMEOUT:
            logger.info("client stalled for %.0f s: cutting off %s", s.STREAM_STALL_TIMEOUT, relay.request_id)
            relay.outcome = "client_stalled"
            self._ticker.discard(self)  # nothing more to watch
            # End the response first: cancelling its handler unblocks whatever it waits on (the server's send, or
            # the stream's end while the relay writes directly) and the server drops the connection
            # (BackpressureServer._abort_unfinished; Uvicorn closes it). This used to come after the settlement
            # below, whose relay.close() stopped the watch: the handler was never cancelled, and a client that
            # never read again kept its connection and its handler.
            self._handler.cancel()
            # Settle here: the response generator's own finally runs only when the cancelled handler's frames are
            # collected, which a server may delay. (The settlement is shielded: stopping this watch meanwhile does
            # not interrupt it.)
            return self.on_stall()
        figures = relay.figures
        if relay.buffer.ended:
            return None
        if figures.first_token_at is None and now - relay.started > s.UPSTREAM_FIRST_TOKEN_TIMEOUT:
            # The provider answered but sent no token in time (slow providers get heartbeats meanwhile).
            return relay.end_early("upstream_error", ApiError(
                f"The upstream provider sent no first token within {s.UPSTREAM_FIRST_TOKEN_TIMEOUT:g} s.",
                status=504, type="server_error", code="upstream_timeout"))
        if (figures.first_token_at is not None and relay.reading_since is not None
                and now - relay.reading_since > s.UPSTREAM_IDLE_TIMEOUT):
            # The provider went silent mid-answer (while the client kept up: a pump waiting on the client is not
            # reading).
            return relay.end_early("upstream_error", ApiError(
                f"The upstream provider sent nothing for {s.UPSTREAM_IDLE_TIMEOUT:g} s.", status=504,
                type="server_error", code="upstream_timeout"))
        if now - relay.started > s.STREAM_MAX_DURATION:
            return relay.end_early("completed", ApiError(
                f"The stream reached its maximum duration of {s.STREAM_MAX_DURATION:g} s.", status=408,
                type="server_error", code="stream_timeout"))
        return None

    @staticmethod
    async def _act(beat, ending):
        try:
            if beat is not None:
                await beat
        finally:
            if ending is not None:
                await ending

    def _acted(self, action):
        self._action = None
        if not action.cancelled() and action.exception() is not None:
            error = action.exception()
            logger.error("watchdog action failed for %s", self.request_id, exc_info=(type(error), error,
                                                                                   error.__traceback__))


class _Ticker:
    """The one task that checks every watchdog of an event loop with the same tick, while any is watched."""

    def __init__(self, key, tick):
        self.key = key
        self.tick = tick
        self.watched = {}  # Watchdog -> None: an ordered set
        self.task = None

    def add(self, watchdog):
        self.watched[watchdog] = None
        if self.task is None:
            # In a context of its own: not the first stream's, whose request it would otherwise carry for good.
            self.task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())

    def discard(self, watchdog):
        self.watched.pop(watchdog, None)

    async def _run(self):
        try:
            while self.watched:
                await asyncio.sleep(self.tick)
                now = time.monotonic()
                for watchdog in list(self.watched):
                    try:
                        watchdog.check(now)
                    except Exception:  # one stream's failure ends no other stream's watch
                        logger.exception("watchdog check failed for %s", watchdog.request_id)
        finally:
            self.task = None
            if _tickers.get(self.key) is self:
                del _tickers[self.key]


_tickers: dict[tuple, _Ticker] = {}  # (event loop, tick) -> its ticker, while it runs


def _ticker(tick) -> _Ticker:
    key = (asyncio.get_running_loop(), tick)
    ticker = _tickers.get(key)
    if ticker is None:
        ticker = _tickers[key] = _Ticker(key, tick)
    return ticker
