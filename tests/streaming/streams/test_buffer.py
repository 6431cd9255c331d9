"""streaming/streams/buffer.py: the prefetch buffer and the process-wide budget, with plain values."""

import asyncio

from django.test import override_settings

from streaming.streams.buffer import MIN_STREAM_BUFFER, PrefetchBuffer, StreamFigures, budget


@override_settings(STREAM_BUFFER_BYTES=64 * 1024, STREAM_GLOBAL_BUFFER_BYTES=1024 * 1024)
def test_the_global_budget_shrinks_each_streams_budget_under_pressure():
    saved = budget.used
    try:
        budget.used = 0
        assert budget.per_stream() == 64 * 1024
        budget.used = 512 * 1024  # half the process-wide budget in use: still the full per-stream budget
        assert budget.per_stream() == 64 * 1024
        budget.used = 768 * 1024  # a quarter left: half the per-stream budget
        assert budget.per_stream() == 32 * 1024
        budget.used = 2 * 1024 * 1024  # over: the floor, so that every stream can still move
        assert budget.per_stream() == MIN_STREAM_BUFFER
    finally:
        budget.used = saved


@override_settings(STREAM_BUFFER_BYTES=100, STREAM_GLOBAL_BUFFER_BYTES=1024 * 1024)
def test_the_buffer_coalesces_and_blocks_the_reader_at_its_budget():
    async def scenario():
        buffer = PrefetchBuffer(StreamFigures())
        await buffer.put(b"a" * 60)
        await buffer.put(b"b" * 30)
        blocked = asyncio.create_task(buffer.put(b"c" * 30))  # 120 > 100: waits
        await asyncio.sleep(0)
        assert not blocked.done()
        assert await buffer.take() == b"a" * 60 + b"b" * 30  # everything pending, as one write
        await blocked
        buffer.end(b"[end]")  # the final event ignores the budget
        assert await buffer.take() == b"c" * 30 + b"[end]"
        assert await buffer.take() is None
        assert buffer.figures.peak_buffered_bytes == 90

    asyncio.run(scenario())
