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


class Writer:
    """What the relay is handed: the server's body writer stands in as an opaque object here."""


def test_the_body_writer_is_offered_only_when_the_parts_go_to_the_server_as_they_are():
    offered = []
    response = EventStreamResponse(_parts(b"data: 1\n\n"), on_direct=offered.append, content_type="text/event-stream")
    asyncio.run(_sent(response))
    assert offered == []  # no writer: another server (Uvicorn, the test client)

    writer = Writer()
    response = EventStreamResponse(_parts(b"data: 1\n\n"), on_direct=offered.append, content_type="text/event-stream")
    response.writer = writer
    asyncio.run(_sent(response))
    assert offered == [writer]

    offered.clear()
    response = EventStreamResponse(_parts(b"unused"), on_direct=offered.append, content_type="text/event-stream")
    response.writer = writer
    response.streaming_content = _parts(b"compressed, say")  # a middleware's content: it must see every part
    messages = asyncio.run(_sent(response))
    assert offered == []
    assert [m.get("body") for m in messages[1:]] == [b"compressed, say", None]
