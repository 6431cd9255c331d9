"""streaming/server/backpressure.py, `_write_through`: a paced stream's chunks reach the socket without the reactor
being asked to watch it for each one (issue 20: per-token CPU of paced streams), on a real server process.

A probe server (the real BackpressureServer) counts the reactor's addWriter calls while an app sends small chunks
one loop turn apart, as a model's tokens arrive, to a client that reads them; /writers reports the count. Before the
change Twisted's write() registered the socket for every chunk (and the doWrite that emptied it unregistered it):
one addWriter per chunk. The body must arrive whole and in order either way.
"""

import json
import sys

import pytest

from bench.servers import HOST, start_server
from tests.support.raw_http import RawHTTPConnection

CHUNKS = 300

PROBE_SERVER = r"""
import asyncio, json, sys

import streaming.server.backpressure
from streaming.server.__main__ import BackpressureCommandLineInterface
from twisted.internet import reactor

calls = {"addWriter": 0}
_add_writer = reactor.addWriter


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
    return json.loads(body)["addWriter"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write_through", ["1", "0"])
def test_paced_chunks_are_written_without_registering_the_socket_each_time(write_through):
    argv = [sys.executable, "-c", PROBE_SERVER, "-b", HOST, "-p", "{port}", "__main__:app"]
    with start_server(argv, env={"SLUICE_WRITE_THROUGH": write_through}) as server:
        before = writers(server.port)
        with RawHTTPConnection(server.port) as reader:
            reader.send_get(f"/stream?{CHUNKS}", close=True)
            status, _, body = reader.read_response()
        registered = writers(server.port) - before
    assert status == 200
    assert body == b"".join(b"data: token %d\n\n" % n for n in range(CHUNKS))
    if write_through == "1":
        # The response head and the last chunk may still go through the reactor; the tokens do not.
        assert registered <= 5, registered
    else:  # the switch off: Twisted's own path, one registration per chunk (what the test tells apart)
        assert registered >= CHUNKS, registered
