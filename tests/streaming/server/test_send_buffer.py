"""streaming/server/backpressure.py: how much of a paused response Twisted holds (SEND_BUFFER_BYTES), on a real server process.

(streaming.server.backpressure is imported only in the server subprocess: importing daphne.server installs Twisted's reactor.)

Twisted pauses a connection's producer once its write buffer holds more than ``transport.bufferSize`` bytes, and
resumes it only once that buffer is empty. So what Twisted holds for a paused stream is what the app wrote between
the last resume and the pause. A probe server (BackpressureServer with a counting gate) records what Twisted's write
buffer holds at every pause; ``/held`` reports them. Chunks of 48 KiB tell the thresholds apart: at 32 KiB the first chunk after a resume
pauses the app (one chunk held), at Twisted's default 64 KiB it takes two (~96 KiB held per paused stream).
"""

import json
import sys

import pytest

from bench.servers import HOST, start_server
from tests.support.raw_http import (
    SMALL_RCVBUF, RawHTTPConnection, assert_stream_body, stream_path, wait_for_plateau,
)

CHUNK = 48 * 1024  # between the two thresholds: 32 KiB < CHUNK <= 64 KiB < 2 * CHUNK
CHUNKS = 512  # 24 MiB: far more than loopback's kernel buffers hold for a stalled reader

PROBE_SERVER = r"""
import json, os, sys

import streaming.server.backpressure
from streaming.server.backpressure import BackpressureServer, ResponseGate
from streaming.server.__main__ import BackpressureCommandLineInterface
from tests.support.asgi_apps import app as stream_app

held_at_pause = []  # the bytes in Twisted's write buffer for the connection, at each pause


class CountingGate(ResponseGate):
    def pauseProducing(self):
        transport = self.channel.transport
        held_at_pause.append(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)
        super().pauseProducing()


streaming.server.backpressure.ResponseGate = CountingGate


class ProbeServer(BackpressureServer):
    send_buffer_bytes = int(os.environ.get("PROBE_SEND_BUFFER_BYTES") or BackpressureServer.send_buffer_bytes)


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/held":
        body = json.dumps({"held_at_pause": held_at_pause, "send_buffer_bytes": ProbeServer.send_buffer_bytes,
                           "default_send_buffer_bytes": streaming.server.backpressure.SEND_BUFFER_BYTES}).encode()
    elif scope["type"] == "http" and scope["path"] == "/body-length":
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"received": size}).encode()
    else:
        return await stream_app(scope, receive, send)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


BackpressureCommandLineInterface.server_class = ProbeServer
BackpressureCommandLineInterface().run(sys.argv[1:])
"""


def probe_server(send_buffer_bytes=None):
    argv = [sys.executable, "-c", PROBE_SERVER, "-b", HOST, "-p", "{port}", "__main__:app"]
    env = {"PROBE_SEND_BUFFER_BYTES": str(send_buffer_bytes or "")}
    return start_server(argv, env=env)


def held_at_pause(port):
    with RawHTTPConnection(port) as connection:
        connection.send_get("/held", close=True)
        status, _, body = connection.read_response()
    assert status == 200, body
    return json.loads(body)


def stall_then_read_all(port, stream_id):
    """Stall a CHUNKS × CHUNK stream until the app stops, note /held, then read it all and check every byte."""
    with RawHTTPConnection(port, rcvbuf=SMALL_RCVBUF) as reader:
        reader.send_get(stream_path(stream_id, CHUNKS, CHUNK))
        stats = wait_for_plateau(port, stream_id)
        assert stats["state"] == "running" and stats["produced_bytes"] < CHUNKS * CHUNK, stats
        held = held_at_pause(port)
        status, _ = reader.read_head()
        assert status == 200
        assert_stream_body(reader.read_body(), stream_id, CHUNKS, CHUNK)
    return held


@pytest.mark.timeout(60)
def test_a_paused_stream_leaves_one_chunk_in_twisted():
    with probe_server() as server:
        held = stall_then_read_all(server.port, "one-chunk")
    # The server's own threshold (streaming.server.backpressure.SEND_BUFFER_BYTES), below one chunk.
    assert held["send_buffer_bytes"] == held["default_send_buffer_bytes"] < CHUNK
    assert held["held_at_pause"], "Twisted never paused the app"
    # Every pause came right after the first chunk written since the last resume: one chunk (with its chunked
    # framing, and the response head at the first pause) in Twisted's buffer.
    assert CHUNK <= max(held["held_at_pause"]) < 2 * CHUNK, held["held_at_pause"][:20]


@pytest.mark.timeout(60)
def test_with_twisteds_default_threshold_a_paused_stream_would_leave_two():
    """The check above can fail: at Twisted's own 64 KiB the app writes a second chunk before it is paused."""
    with probe_server(send_buffer_bytes=64 * 1024) as server:
        held = stall_then_read_all(server.port, "two-chunks")
    assert 2 * CHUNK <= max(held["held_at_pause"]) < 3 * CHUNK, held["held_at_pause"][:20]


@pytest.mark.timeout(60)
def test_a_large_request_body_still_arrives_whole():
    """Twisted also reads the socket in pieces of bufferSize: a 1 MB request body arrives intact."""
    body = b"x" * 1_000_000
    with probe_server() as server, RawHTTPConnection(server.port) as connection:
        connection.sock.sendall(
            b"POST /body-length HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (HOST.encode(), len(body), body))
        status, _, response = connection.read_response()
    assert status == 200, response
    assert json.loads(response) == {"received": len(body)}
