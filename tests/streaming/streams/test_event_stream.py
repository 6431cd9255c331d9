"""streaming/streams/event_stream.py: the stream's parts reach Django's ASGI handler as they are (issue 20: no
wrapping generators per paced token), and a middleware that replaces the content is still honoured."""

import asyncio

from django.core.handlers.asgi import ASGIHandler

from streaming.streams.event_stream import EventStreamResponse


async def _parts(*parts):
    for part in parts:
        yield part


async def _sent(response):
    messages = []

    async def send(message):
        messages.append(message)

    await ASGIHandler().send_response(response, send)
    return messages


def test_the_handler_iterates_the_parts_generator_itself():
    parts = _parts(b"data: 1\n\n", b"data: 2\n\n")
    response = EventStreamResponse(parts, content_type="text/event-stream")
    assert aiter(response) is parts  # StreamingHttpResponse's own __aiter__ wraps it twice
    messages = asyncio.run(_sent(response))
    assert messages[0]["status"] == 200
    assert [m.get("body") for m in messages[1:]] == [b"data: 1\n\n", b"data: 2\n\n", None]


def test_content_replaced_by_a_middleware_is_iterated_djangos_way():
    response = EventStreamResponse(_parts(b"unused"), content_type="text/event-stream")

    async def upper(content):
        async for part in content:
            yield part.decode().upper()  # str: Django's make_bytes turns it into bytes

    response.streaming_content = upper(_parts(b"a", b"b"))
    messages = asyncio.run(_sent(response))
    assert [m.get("body") for m in messages[1:]] == [b"A", b"B", None]
