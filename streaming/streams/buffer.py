"""What a stream holds between the provider and the client: a bounded prefetch buffer, under a process-wide budget.

While the client keeps up, each part is taken the moment it arrives; while the client is behind (the server's
`await send()` is paused by a full socket), parts coalesce up to the stream's byte budget, and then `put` waits —
the relay stops reading the provider, whose own send then blocks, so it stops generating. docs/backpressure.md.
"""

import asyncio
from dataclasses import dataclass

from django.conf import settings

# The smallest per-stream budget under global pressure: one ordinary event always fits.
MIN_STREAM_BUFFER = 2048


class BufferBudget:
    """The process-wide cap on bytes held in prefetch buffers.

    Until half of STREAM_GLOBAL_BUFFER_BYTES is in use every stream gets STREAM_BUFFER_BYTES; beyond that the
    per-stream budget shrinks in proportion to what is left.
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
    """What the ledger row and the live panel record of a stream."""

    bytes_sent: int = 0
    pauses: int = 0
    paused_seconds: float = 0.0
    peak_buffered_bytes: int = 0
    completion_tokens: int = 0  # metered
    first_token_at: float | None = None  # monotonic


class PrefetchBuffer:
    """Bytes read ahead of the client; `put` waits while the buffer is over its budget."""

    def __init__(self, figures: StreamFigures):
        self.parts: list[bytes] = []
        self.size = 0
        self.ended = False
        self.figures = figures
        # What the one reader (the response) waits on while the buffer is empty: a future made when it waits, not an
        # asyncio.Event held for the stream's whole life (its waiters' deque: ~650 bytes a stream, issue 20 item 2).
        self._readable = None
        self._writable = None  # made when a put first waits: most streams never fill their buffer (~750 bytes)

    async def put(self, data: bytes):
        # An empty buffer always takes one part, so a stream never deadlocks on a large chunk.
        while self.size and self.size + len(data) > budget.per_stream():
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()
            await self._writable.wait()
        self._append(data)

    def _append(self, data):
        self.parts.append(data)
        self.size += len(data)
        budget.used += len(data)
        if self.size > self.figures.peak_buffered_bytes:
            self.figures.peak_buffered_bytes = self.size
        self._wake_reader()

    def _wake_reader(self):
        waiter = self._readable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, final: bytes = b""):
        """No more data after `final` (an error event or [DONE]); ignores the budget."""
        if final:
            self._append(final)
        self.ended = True
        self._wake_reader()

    async def take(self, timeout: float | None = None) -> bytes | None:
        """Everything buffered, as one write; b"" if `timeout` passed first; None at the end."""
        if not self.parts and not self.ended:
            self._readable = waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    try:
                        await asyncio.wait_for(waiter, timeout)
                    except TimeoutError:
                        return b""
            finally:
                self._readable = None
        if not self.parts:
            return None
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts.clear()
        budget.used -= self.size
        self.size = 0
        if self._writable is not None:
            self._writable.set()
        return data

    def discard(self):
        budget.used -= self.size
        self.parts.clear()
        self.size = 0
