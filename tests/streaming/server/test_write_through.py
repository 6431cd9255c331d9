"""streaming/server/backpressure.py, `_send_chunk`, `_write_through` and `BodyWriter`: a paced stream's chunks reach
the socket without the reactor being asked to watch it for each one, and without Twisted's `Request.write` (issue 20:
per-token CPU of paced streams), on a real server process; an app may write them itself through the body writer.

A probe server (the real BackpressureServer) counts the reactor's addWriter calls and Twisted's Request.write calls
while an app sends small chunks one loop turn apart, as a model's tokens arrive, to a client that reads them;
/writers reports the counts. Before the first change Twisted's write() registered the socket for every chunk (and the
doWrite that emptied it unregistered it): one addWriter per chunk; before the second, every chunk went through
Request.write. The body must arrive whole, in order and correctly framed either way, also when the socket takes only
part of a chunk (a slow reader of large chunks).
"""

import json
import sys

import pytest

from bench.servers import HOST, start_server
from tests.support.gateways import eventually
from tests.support.raw_http import SMALL_RCVBUF, RawHTTPConnection

CHUNKS = 300

PROBE_SERVER = r"""
import asyncio, json, sys

import streaming.server.backpressure
from streaming.server.__main__ import BackpressureCommandLineInterface
from twisted.internet import reactor

from twisted.web import http

calls = {"addWriter": 0, "Request.write": 0, "writer_waits": 0, "writer_gone": 0}
_add_writer = reactor.addWriter
_request_write = http.Request.write


def counting_request_write(self, data):
    calls["Request.write"] += 1
    return _request_write(self, data)


http.Request.write = counting_request_write


def counting_add_writer(writer):
    calls["addWriter"] += 1
    return _add_writer(writer)


reactor.addWriter = counting_add_writer


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/writers":
        body = json.dumps(calls).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    count = int(scope["query_string"] or b"1")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"].startswith("/writer"):  # the chunks through the server's body writer (BodyWriter)
        writer = scope["extensions"]["sluice.body_writer"]["writer"]
        large = scope["path"] == "/writer-large"
        await send({"type": "http.response.body", "body": b"head\n", "more_body": True})
        for n in range(count):
            if not writer.write(b"%08d" % n * 8192 if large else b"data: token %d\n\n" % n):
                calls["writer_gone"] += 1
                return
            if not writer.open:
                calls["writer_waits"] += 1
                await writer.wait()
            if not large:
                await asyncio.sleep(0.001)
        await send({"type": "http.response.body", "body": b"tail\n"})
        return
    if scope["path"] == "/large":  # 64 KiB chunks, back to back: more than a slow reader's socket takes at once
        for n in range(count):
            await send({"type": "http.response.body", "body": b"%08d" % n * 8192, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    for n in range(count):
        await send({"type": "http.response.body", "body": b"data: token %d\n\n" % n, "more_body": True})
        await asyncio.sleep(0.001)  # the next token, a loop turn or more later
    await send({"type": "http.response.body", "body": b""})


BackpressureCommandLineInterface().run(sys.argv[1:])
"""


def writers(port):
    with RawHTTPConnection(port) as connection:
        connection.send_get("/writers", close=True)
        status, _, body = connection.read_response()
    assert status == 200, body
    return json.loads(body)


def probe_server(write_through):
    argv = [sys.executable, "-c", PROBE_SERVER, "-b", HOST, "-p", "{port}", "__main__:app"]
    return start_server(argv, env={"SLUICE_WRITE_THROUGH": write_through})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write_through", ["1", "0"])
def test_paced_chunks_are_written_without_registering_the_socket_each_time(write_through):
    with probe_server(write_through) as server:
        before = writers(server.port)
        with RawHTTPConnection(server.port) as reader:
            reader.send_get(f"/stream?{CHUNKS}", close=True)
            status, _, body = reader.read_response()
        after = writers(server.port)
    registered = after["addWriter"] - before["addWriter"]
    request_writes = after["Request.write"] - before["Request.write"]
    assert status == 200
    assert body == b"".join(b"data: token %d\n\n" % n for n in range(CHUNKS))
    if write_through == "1":
        # The response head and the last chunk may still go through the reactor and Request.write; the tokens do not.
        assert registered <= 5, registered
        assert request_writes <= 5, request_writes
    else:  # the switch off: Twisted's own path, one registration and one Request.write per chunk
        assert registered >= CHUNKS, registered
        assert request_writes >= CHUNKS, request_writes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("write_through", ["1", "0"])
def test_large_chunks_to_a_slow_reader_arrive_whole_and_framed(write_through):
    """16 MB in 64 KiB chunks to a reader with a 4 KiB receive buffer: the socket takes part of a chunk, the rest is
    left to Twisted's buffer (and the reactor); the chunked framing the client parses and the bytes stay exact."""
    chunks = 256
    with probe_server(write_through) as server:
        with RawHTTPConnection(server.port, rcvbuf=SMALL_RCVBUF) as reader:
            reader.send_get(f"/large?{chunks}", close=True)
            status, _, body = reader.read_response()
    assert status == 200
    assert len(body) == chunks * 65536
    assert body == b"".join(b"%08d" % n * 8192 for n in range(chunks))


@pytest.mark.timeout(60)
def test_chunks_written_through_the_body_writer_arrive_in_order_between_the_sent_ones():
    with probe_server("1") as server:
        before = writers(server.port)
        with RawHTTPConnection(server.port) as reader:
            reader.send_get(f"/writer?{CHUNKS}", close=True)
            status, _, body = reader.read_response()
        after = writers(server.port)
    assert status == 200
    assert body == b"head\n" + b"".join(b"data: token %d\n\n" % n for n in range(CHUNKS)) + b"tail\n"
    assert after["Request.write"] - before["Request.write"] <= 5
    assert after["writer_waits"] == before["writer_waits"]  # a reader that keeps up never holds the writer


@pytest.mark.timeout(120)
def test_the_body_writer_holds_the_app_while_a_slow_reader_is_behind():
    """16 MB through the writer to a reader with a 4 KiB receive buffer: `open` turns False once Twisted holds more
    than the send buffer's worth, the app waits, and every byte arrives whole and framed."""
    chunks = 256
    with probe_server("1") as server:
        with RawHTTPConnection(server.port, rcvbuf=SMALL_RCVBUF) as reader:
            reader.send_get(f"/writer-large?{chunks}", close=True)
            status, _, body = reader.read_response()
        counts = writers(server.port)
    assert status == 200
    assert body == b"head\n" + b"".join(b"%08d" % n * 8192 for n in range(chunks)) + b"tail\n"
    assert counts["writer_waits"] > 0


@pytest.mark.timeout(60)
def test_the_body_writer_says_when_the_client_is_gone():
    with probe_server("1") as server:
        reader = RawHTTPConnection(server.port)
        with reader:
            reader.send_get("/writer?100000", close=True)
            reader.read_head()
        # The app writes on (a token a millisecond) and learns the connection is gone from write()'s False.
        eventually(lambda: writers(server.port)["writer_gone"] == 1, timeout=10)
