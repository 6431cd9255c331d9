"""The relay: provider → bounded prefetch buffer → client, with backpressure end to end.

A reader task pulls SSE events from the provider into a `PrefetchBuffer`; the response's async
generator takes whatever is buffered and yields it as one write. While the client keeps up, each
chunk is written the moment it arrives; while the client is behind (the server's `await send()`
is paused by a full socket), chunks coalesce in the buffer up to its byte budget, and then the
reader stops reading the provider — whose own send then blocks, so it stops generating.

A watchdog per stream cuts off a client that accepts nothing for STREAM_STALL_TIMEOUT, ends
streams at STREAM_MAX_DURATION, and renews the stream's quota lease and slot (their heartbeat).
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from django.conf import settings

from quotas.policy import chunk_tokens

from . import live
from .errors import ApiError
from .upstream import UpstreamError

logger = logging.getLogger(__name__)

# A yield that takes longer than this waited on the client: one backpressure pause.
PAUSE_SECONDS = 0.005
HEARTBEAT = b": keep-alive\n\n"
OPENED = b": stream open\n\n"
DONE = b"data: [DONE]\n\n"
# The smallest per-stream budget under global pressure: one ordinary event always fits.
MIN_STREAM_BUFFER = 2048


class BufferBudget:
    """The process-wide cap on bytes held in prefetch buffers.

    Until half of STREAM_GLOBAL_BUFFER_BYTES is in use every stream gets STREAM_BUFFER_BYTES;
    beyond that the per-stream budget shrinks in proportion to what is left.
    """

    def __init__(self):
        self.used = 0

    def per_stream(self) -> int:
        base, cap = settings.STREAM_BUFFER_BYTES, settings.STREAM_GLOBAL_BUFFER_BYTES
        free = cap - self.used
        if free >= cap / 2:
            return base
        return max(MIN_STREAM_BUFFER, int(base * max(0, free) / (cap / 2)))


budget = BufferBudget()


@dataclass
class StreamFigures:
    bytes_sent: int = 0
    pauses: int = 0
    paused_seconds: float = 0.0
    peak_buffered_bytes: int = 0
    completion_tokens: int = 0  # metered
    first_token_at: float | None = None
    paused: bool = False  # right now, for the live panel


class PrefetchBuffer:
    """Bytes read ahead of the client; `put` waits while the buffer is over its budget."""

    def __init__(self, figures: StreamFigures):
        self.parts: list[bytes] = []
        self.size = 0
        self.ended = False
        self.figures = figures
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    async def put(self, data: bytes):
        # An empty buffer always takes one event, so a stream never deadlocks on a large chunk.
        while self.size and self.size + len(data) > budget.per_stream():
            self._writable.clear()
            await self._writable.wait()
        self._append(data)

    def _append(self, data):
        self.parts.append(data)
        self.size += len(data)
        budget.used += len(data)
        if self.size > self.figures.peak_buffered_bytes:
            self.figures.peak_buffered_bytes = self.size
        self._readable.set()

    def end(self, final: bytes = b""):
        """No more data after `final` (an error event or [DONE]); ignores the budget."""
        if final:
            self._append(final)
        self.ended = True
        self._readable.set()

    async def take(self, timeout: float | None = None) -> bytes | None:
        """Everything buffered, as one write; b"" if `timeout` passed first; None at the end."""
        if not self.parts and not self.ended:
            if timeout is None:
                await self._readable.wait()
            else:
                try:
                    await asyncio.wait_for(self._readable.wait(), timeout)
                except TimeoutError:
                    return b""
        self._readable.clear()
        if not self.parts:
            return None
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts.clear()
        budget.used -= self.size
        self.size = 0
        self._writable.set()
        return data

    def discard(self):
        budget.used -= self.size
        self.parts.clear()
        self.size = 0


class Relay:
    """One streaming response: `stream()` is the StreamingHttpResponse's content."""

    def __init__(self, exchange, events):
        self.exchange = exchange
        self.events = events
        self.figures = StreamFigures()
        self.buffer = PrefetchBuffer(self.figures)
        self.outcome = None  # set by whoever ends the stream other than the client
        self.reported_usage = None
        self.started = time.monotonic()
        self.yield_started = None
        self.draining = False  # [DONE] came; the pump reads the rest of the provider's body
        self.reason = ""  # for the ledger: the error code that ended the stream
        self._closing = None  # the task that closes and settles the stream
        self.reading_since = None  # when the pump began waiting for the provider (None: not waiting)

    def is_paused(self):
        started = self.yield_started
        return started is not None and time.monotonic() - started > PAUSE_SECONDS

    async def _pump(self):
        """Read provider events into the buffer, metering and leasing tokens as they come.

        The events of one read are metered one by one and buffered as one part (one write to a client that keeps
        up, coalesced with more for one that doesn't).
        """
        exchange, figures = self.exchange, self.figures
        lease = exchange.lease
        include_usage = exchange.chat.include_usage
        final = b""
        first = True
        try:
            while True:
                self.reading_since = time.monotonic()
                batch = await self.events.read_batch()
                self.reading_since = None
                if batch is None:
                    break
                if self.draining:
                    continue
                parts = []
                for data in batch:
                    if data == b"[DONE]":
                        self.outcome = self.outcome or "completed"
                        # The client has its answer now; read the body's end so the provider's connection goes
                        # back to the pool instead of being closed mid-response.
                        self.draining = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        # The provider failed mid-answer; its message may name internals, so use ours.
                        logger.warning("upstream error event mid-stream for %s", exchange.request_id)
                        self.outcome = "upstream_error"
                        final = ApiError("The upstream provider failed while answering.", status=502,
                                         type="server_error", code="upstream_error").sse_event()
                        break
                    usage = chunk.get("usage")
                    if usage:
                        self.reported_usage = usage
                    choices = chunk.get("choices")
                    if choices:
                        tokens = 0
                        for choice in choices:
                            delta = choice.get("delta") or {}
                            content = delta.get("content") or delta.get("reasoning_content") or delta.get("refusal")
                            if content:
                                tokens += chunk_tokens(content)
                            elif delta.get("tool_calls"):
                                tokens += 1
                        if tokens:
                            if figures.completion_tokens + tokens > lease.completion_leased:
                                if not await lease.need(figures.completion_tokens + tokens - lease.completion_leased):
                                    self.outcome = "quota_exhausted"
                                    final = lease.exhausted_error().sse_event()
                                    break
                            figures.completion_tokens += tokens
                            if figures.first_token_at is None:
                                figures.first_token_at = time.monotonic()
                    elif usage and not include_usage:
                        continue  # Sluice always asks for usage; the client gets it only if it asked
                    parts.append(b"data: " + data + b"\n\n")
                if parts:
                    part = parts[0] if len(parts) == 1 else b"".join(parts)
                    # put() waits while the client is behind: meanwhile this frame holds no other copy of the
                    # events (the read's payloads, the parsed JSON, the parts).
                    batch = parts = data = chunk = choices = choice = delta = content = usage = None
                    await self.buffer.put(part)
                    part = None
                    if first:
                        first = False
                        # One loop turn, for the response to write the first token before this task reads on: a
                        # provider that is ahead would otherwise keep it relaying the rest of its answer first.
                        await asyncio.sleep(0)
                if self.draining:
                    self.buffer.end(DONE)
                elif final:
                    break
            else:
                if not self.draining:
                    self.outcome = "upstream_error"
                    final = ApiError("The upstream provider ended the answer early.", status=502,
                                     type="server_error", code="upstream_error").sse_event()
        except UpstreamError as error:
            if self.draining:  # the answer was complete; only its tail failed
                return
            self.outcome = "upstream_error"
            final = ApiError(error.message, status=error.status, type="server_error", code=error.code).sse_event()
        except ApiError as error:  # the quota store failed closed mid-stream
            self.outcome = "upstream_error" if error.status >= 500 else "quota_exhausted"
            final = error.sse_event()
        except Exception:
            logger.exception("relay failed for %s", exchange.request_id)
            self.outcome = "upstream_error"
            final = ApiError("The gateway failed while relaying the answer.", status=500,
                             type="server_error", code="internal_error").sse_event()
        finally:
            # Stop the provider now: don't wait for the client to drain the buffer.
            await self.events.aclose()
        if not self.buffer.ended:
            self.buffer.end(final)

    async def _watch(self, handler):
        """Stall cut-off, maximum duration, and the lease and slot heartbeat."""
        stall, max_duration = settings.STREAM_STALL_TIMEOUT, settings.STREAM_MAX_DURATION
        first_token_timeout, idle_timeout = settings.UPSTREAM_FIRST_TOKEN_TIMEOUT, settings.UPSTREAM_IDLE_TIMEOUT
        renew_every = settings.QUOTA_SLOT_TTL / 3
        tick = max(0.05, min(1.0, stall / 4, renew_every, idle_timeout / 4))
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            self.exchange.record_start()
            now = time.monotonic()
            if self.yield_started is not None and now - self.yield_started > stall:
                logger.info("client stalled for %.0f s: cutting off %s", stall, self.exchange.request_id)
                self.outcome = "client_stalled"
                # Settle here: the generator's own finally runs only when the cancelled handler's
                # frames are collected, which a server may delay.
                await self._shutdown("client_stalled")
                handler.cancel()  # unblocks the server's send and ends the response
                return
            if self.buffer.ended:
                pass
            elif self.figures.first_token_at is None and now - self.exchange.started > first_token_timeout:
                # The provider answered but sent no token in time (slow providers get heartbeats meanwhile).
                await self._end_early("upstream_error", ApiError(
                    f"The upstream provider sent no first token within {first_token_timeout:g} s.", status=504,
                    type="server_error", code="upstream_timeout"))
            elif (self.figures.first_token_at is not None and self.reading_since is not None
                  and now - self.reading_since > idle_timeout):
                # The provider went silent mid-answer (while the client kept up: a pump waiting on the client is
                # not reading).
                await self._end_early("upstream_error", ApiError(
                    f"The upstream provider sent nothing for {idle_timeout:g} s.", status=504,
                    type="server_error", code="upstream_timeout"))
            elif now - self.started > max_duration:
                await self._end_early("completed", ApiError(
                    f"The stream reached its maximum duration of {max_duration:g} s.", status=408,
                    type="server_error", code="stream_timeout"))
            if now - renewed > renew_every:
                renewed = now
                await self.exchange.renew()

    async def _end_early(self, outcome, error):
        """Stop the provider and end the client's stream with `error` as its last event."""
        self.outcome, self.reason = outcome, error.code
        self._pump_task.cancel()
        await self.events.aclose()
        if not self.buffer.ended:
            self.buffer.end(error.sse_event())

    async def stream(self):
        exchange, figures, buffer = self.exchange, self.figures, self.buffer
        self._pump_task = asyncio.create_task(self._pump())
        watchdog = asyncio.create_task(self._watch(asyncio.current_task()))
        live.register(exchange, figures)
        heartbeat = settings.STREAM_HEARTBEAT_INTERVAL
        delivered_end = False
        try:
            if self.events.awaiting_first_token:
                # A slow provider: flush the response headers now (some servers send them with the first body
                # bytes), heartbeats follow. Otherwise the first token is in and is the first write.
                yield OPENED
            while True:
                waiting_first = figures.first_token_at is None
                data = await buffer.take(heartbeat if waiting_first else None)
                if data is None:
                    delivered_end = True
                    break
                if not data:
                    data = HEARTBEAT  # keeps proxies from closing an idle connection
                self.yield_started = started = time.monotonic()
                yield data
                waited = time.monotonic() - started
                self.yield_started = None
                figures.bytes_sent += len(data)
                if waited > PAUSE_SECONDS:
                    figures.pauses += 1
                    figures.paused_seconds += waited
        finally:
            self.yield_started = None
            watchdog.cancel()
            # The client went away unless the stream's end reached it or it was cut off.
            outcome = self.outcome if delivered_end or self.outcome == "client_stalled" else "client_disconnected"
            await self._shutdown(outcome)

    async def _shutdown(self, outcome):
        """Stop reading the provider, close its stream, and settle: once, whoever asks first.

        A task of its own, awaited through a shield: the server cancels the response's handler when the client
        goes away, which may happen while this runs (a client that leaves right after [DONE]); the provider must
        still be closed and the request settled.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(outcome))
        await asyncio.shield(self._closing)

    async def _close(self, outcome):
        if self.draining:
            # The body's end follows [DONE] at once from a well-behaved provider: let the pump read it.
            await asyncio.wait([self._pump_task], timeout=0.25)
        self._pump_task.cancel()
        live.unregister(self.exchange)
        try:
            # The pump closes the provider's stream in its own finally.
            await asyncio.wait([self._pump_task])
        finally:
            self.buffer.discard()
            await self.events.aclose()
            await self.exchange.finish(outcome, self.figures, self.reported_usage, reason=self.reason)
