"""A raw ASGI app for server tests (no Django), run in a server subprocess as ``tests.asgi_apps:app``.

- ``GET /stream?id=ID&chunks=N&size=BYTES``: streams N numbered chunks of BYTES each (see ``chunk_bytes``).
- ``GET /stats?id=ID``: JSON ``{"produced_bytes": ..., "state": "running" | "done"}`` for that stream, where
  produced bytes count the chunks whose ``await send()`` has returned, i.e. what the server has taken so far;
  404 before the stream exists. Read it on a separate connection.
- WebSocket (any path): accepts, then echoes every message back.
"""

import json
from urllib.parse import parse_qs

# stream id -> {"produced_bytes": int, "state": str}; one per server process, ids chosen by the tests.
_streams = {}


def chunk_bytes(stream_id, seq, size):
    """Chunk ``seq`` of a stream: ``ID:SEQUENCE:`` then filler up to ``size`` bytes, ending in a newline."""
    head = b"%s:%08d:" % (stream_id.encode("ascii"), seq)
    if size < len(head) + 1:
        raise ValueError(f"chunk size {size} is too small for its header {head!r}")
    return head + b"." * (size - len(head) - 1) + b"\n"


def _query(scope):
    return {key: values[0] for key, values in parse_qs(scope["query_string"].decode("ascii")).items()}


async def _respond(send, status, body, content_type=b"application/json"):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _stream(scope, send):
    query = _query(scope)
    stream_id, chunks, size = query.get("id", "s"), int(query.get("chunks", "1")), int(query.get("size", "64"))
    stats = _streams[stream_id] = {"produced_bytes": 0, "state": "running"}
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    for seq in range(chunks):
        await send({"type": "http.response.body", "body": chunk_bytes(stream_id, seq, size), "more_body": True})
        stats["produced_bytes"] += size
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    stats["state"] = "done"


async def _stats(scope, send):
    stats = _streams.get(_query(scope).get("id", "s"))
    if stats is None:
        await _respond(send, 404, b'{"error": "no such stream"}')
    else:
        await _respond(send, 200, json.dumps(stats).encode())


async def _http(scope, receive, send):
    if scope["path"] == "/stream":
        await _stream(scope, send)
    elif scope["path"] == "/stats":
        await _stats(scope, send)
    else:
        await _respond(send, 404, b"not found", b"text/plain")


async def _websocket(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
        elif message["type"] == "websocket.disconnect":
            return


async def _lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    handler = {"http": _http, "websocket": _websocket, "lifespan": _lifespan}[scope["type"]]
    await handler(scope, receive, send)
