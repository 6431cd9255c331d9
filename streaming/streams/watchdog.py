"""A stream's timers, one task per stream: the stalled-client cut-off, the provider's first-token and idle
timeouts, the maximum duration, and the heartbeat that keeps the stream's lease and slot alive.

No timer is armed per read or per write (docs/performance.md): the watchdog looks at the relay's timestamps once a
tick (at most a second, a quarter of the shortest timeout it enforces).
"""

import asyncio
import logging
import time

from streaming.errors import ApiError

logger = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, relay, *, heartbeat, on_stall, settings):
        self.relay = relay
        self.heartbeat = heartbeat  # awaited every tick: the lifecycle's ledger row and lease renewal
        self.on_stall = on_stall  # awaited when the client stalled, once its handler is cancelled
        self.settings = settings
        self._task = None

    def start(self, handler: asyncio.Task):
        """Watch the relay whose response `handler` (the task writing it) sends."""
        self._task = asyncio.create_task(self._run(handler))

    def stop(self):
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def tick_seconds(self) -> float:
        s = self.settings
        return max(0.05, min(1.0, s.STREAM_STALL_TIMEOUT / 4, s.QUOTA_SLOT_TTL / 3, s.UPSTREAM_IDLE_TIMEOUT / 4))

    async def _run(self, handler):
        relay, s = self.relay, self.settings
        tick = self.tick_seconds()
        while True:
            await asyncio.sleep(tick)
            await self.heartbeat()
            now = time.monotonic()
            if relay.yield_started is not None and now - relay.yield_started > s.STREAM_STALL_TIMEOUT:
                logger.info("client stalled for %.0f s: cutting off %s", s.STREAM_STALL_TIMEOUT, relay.request_id)
                relay.outcome = "client_stalled"
                # End the response first: cancelling its handler unblocks whatever it waits on (the server's send,
                # or the stream's end while the relay writes directly) and the server drops the connection
                # (BackpressureServer._abort_unfinished; Uvicorn closes it). This used to come after the settlement
                # below, whose relay.close() stops this very task: the handler was never cancelled, and a client
                # that never read again kept its connection and its handler.
                handler.cancel()
                # Settle here: the response generator's own finally runs only when the cancelled handler's frames
                # are collected, which a server may delay. (This task may be stopped meanwhile; the settlement is
                # shielded.)
                await self.on_stall()
                return
            figures = relay.figures
            if relay.buffer.ended:
                pass
            elif figures.first_token_at is None and now - relay.started > s.UPSTREAM_FIRST_TOKEN_TIMEOUT:
                # The provider answered but sent no token in time (slow providers get heartbeats meanwhile).
                await relay.end_early("upstream_error", ApiError(
                    f"The upstream provider sent no first token within {s.UPSTREAM_FIRST_TOKEN_TIMEOUT:g} s.",
                    status=504, type="server_error", code="upstream_timeout"))
            elif (figures.first_token_at is not None and relay.reading_since is not None
                  and now - relay.reading_since > s.UPSTREAM_IDLE_TIMEOUT):
                # The provider went silent mid-answer (while the client kept up: a pump waiting on the client is not
                # reading).
                await relay.end_early("upstream_error", ApiError(
                    f"The upstream provider sent nothing for {s.UPSTREAM_IDLE_TIMEOUT:g} s.", status=504,
                    type="server_error", code="upstream_timeout"))
            elif now - relay.started > s.STREAM_MAX_DURATION:
                await relay.end_early("completed", ApiError(
                    f"The stream reached its maximum duration of {s.STREAM_MAX_DURATION:g} s.", status=408,
                    type="server_error", code="stream_timeout"))
