"""streaming/provider/wire.py: the HTTP/1.1 client of the provider streams, against real servers on loopback: aiohttp's
own web server, and raw asyncio servers where a test needs exact bytes (a close-delimited body, a malformed response,
a connection closed mid-chunk, an idle connection the server closes).

Every test runs on asyncio's default loop and on uvloop (production's), through the `run` fixture.
"""

import asyncio
import datetime
import gc
import ipaddress
import logging
import socket
import ssl

import httpx2
import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from streaming.provider.wire import WireBody, WirePool, WireResponse

EVENTS = [b'{"choices":[{"index":0,"delta":{"content":"tok%d"}}]}' % n for n in range(50)]
BODY = b"".join(b"data: " + e + b"\n\n" for e in EVENTS) + b"data: [DONE]\n\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a test's coroutine on a fresh loop of either kind, with a deadline so that a hang fails fast."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run(coro, deadline=20):
        async def bounded():
            async with asyncio.timeout(deadline):
                return await coro
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())
    return run


async def eventually(condition, what="the condition"):
    """Polls `condition` with the loop running (the servers and the client make progress meanwhile)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"{what} never held")


def chunked(body: bytes, size: int = 37) -> bytes:
    pieces = [b"%x\r\n%s\r\n" % (len(body[n:n + size]), body[n:n + size]) for n in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def sized(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Raw:
    """An asyncio server on loopback running `handler(reader, writer, n)` per connection (n: 0 for the first)."""

    def __init__(self, handler):
        self.handler = handler
        self.accepted = 0
        self.closed = 0  # connections whose handler has finished
        self.writers = []
        self.errors = []  # a handler's failed assertion, which asyncio would only log

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = httpx2.URL(f"http://127.0.0.1:{self.port}/v1/chat/completions")
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        if hasattr(self.server, "close_clients"):  # asyncio's: also a connection accepted that no handler saw yet
            self.server.close_clients()
        for writer in self.writers:  # uvloop's Server has no close_clients()
            writer.close()
        await eventually(lambda: self.closed == self.accepted, "the handlers' ends")
        # Each connection's transport gone before the loop closes: one left to the collector warns (ResourceWarning)
        # and, on Python 3.13.0, raises in the closed server's _detach (an unraisable exception in another test).
        for writer in self.writers:
            try:
                await writer.wait_closed()
            except OSError:  # the connection's own end (a reset): it is closed all the same
                pass
        await self.server.wait_closed()
        if self.errors and exc[0] is None:
            raise self.errors[0]

    async def _connected(self, reader, writer):
        n, self.accepted = self.accepted, self.accepted + 1
        self.writers.append(writer)
        try:
            await self.handler(reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()
            self.closed += 1


async def read_request(reader) -> bytes:
    """One request (its head, and the body its Content-Length announces); b"" at the connection's EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def chunked_head(reader, writer):
    """Reads the request and answers with a chunked event stream's head (the body is the test's)."""
    await read_request(reader)
    writer.write(CHUNKED_HEAD)
    await writer.drain()


def headers(url: httpx2.URL, body: bytes = b"") -> list[tuple[bytes, bytes]]:
    return [(b"Host", url.netloc), (b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]


async def post(pool, url, body=b'{"stream":true}', **kwargs):
    return await pool.request("POST", url, headers(url, body), body, **kwargs)


async def read_all(body) -> bytes:
    pieces = []
    while piece := await body.read():
        pieces.append(piece)
    return b"".join(pieces)


async def answer_forever(reader, writer, response: bytes):
    """A kept-alive connection: the same response to every request until the client closes."""
    while await read_request(reader):
        writer.write(response)
        await writer.drain()
    await asyncio.sleep(0)


async def aiohttp_server(handler, ssl_context=None):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner, sock.getsockname()[1]


async def stream_events(request):
    """aiohttp's chunked stream of BODY, in pieces that split events anywhere."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for n in range(0, len(BODY), 37):
        await response.write(BODY[n:n + 37])
    await response.write_eof()
    return response


# 1. Pull mode.

def test_a_chunked_event_stream_split_at_odd_places_is_read_whole(run):
    async def handler(reader, writer, n):
        assert (await read_request(reader)).startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        wire = CHUNKED_HEAD + chunked(BODY)
        for n in range(0, len(wire), 13):  # splits the head, chunk-size lines and CRLFs anywhere
            writer.write(wire[n:n + 13])
            await writer.drain()
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert (response.status, response.reason) == (200, "OK")
            assert response.headers == [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")]
            assert await read_all(response.body) == BODY
            assert response.body.ended and await response.body.read() == b""
            await response.body.aclose()
            await pool.aclose()
    run(scenario())


def test_an_aiohttp_server_s_stream_is_read_whole(run):
    peers = set()

    async def handler(request):
        assert await request.read() == b'{"stream":true}'
        peers.add(request.transport.get_extra_info("peername"))
        return await stream_events(request)

    async def scenario():
        runner, port = await aiohttp_server(handler)
        url = httpx2.URL(f"http://127.0.0.1:{port}/v1/chat/completions")
        pool = WirePool()
        try:
            for _ in range(2):
                response = await post(pool, url)
                assert response.status == 200
                assert await read_all(response.body) == BODY
                await response.body.aclose()
            assert len(peers) == 1  # kept alive
        finally:
            await pool.aclose()
            await runner.cleanup()
    run(scenario())


# 2. Push mode.

def test_pushed_pieces_arrive_from_data_received_and_the_end_once(run):
    go = []

    async def handler(reader, writer, n):
        await chunked_head(reader, writer)
        await eventually(lambda: go)
        for n in range(0, len(BODY), 100):
            writer.write(chunked(BODY[n:n + 100], 100)[:-5])  # one chunk per write
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            pieces, ends, tasks = [], [], []

            def on_piece(piece):
                tasks.append(asyncio.current_task())
                pieces.append(piece)

            assert response.body.push(on_piece, ends.append)
            go.append(True)
            await eventually(lambda: ends)
            assert ends == [None] and b"".join(pieces) == BODY
            assert set(tasks) == {None}  # called from the protocol, in no task
            assert not response.body.push(on_piece, ends.append)  # the body has ended
            await response.body.aclose()
            await pool.aclose()
    run(scenario())


def test_pull_from_inside_on_piece_returns_later_pieces_to_read(run):
    go = []
    pieces_sent = [BODY[n:n + 100] for n in range(0, len(BODY), 100)]

    async def handler(reader, writer, n):
        await chunked_head(reader, writer)
        await eventually(lambda: go)
        # One write of many chunks: one socket read, most likely, and several on_body calls.
        writer.write(b"".join(chunked(piece, 100)[:-5] for piece in pieces_sent) + b"0\r\n\r\n")
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            pushed, ends = [], []

            def on_piece(piece):
                pushed.append(piece)
                body.pull()

            assert body.push(on_piece, ends.append)
            go.append(True)
            await eventually(lambda: pushed)
            rest = await read_all(body)
            assert pushed == [pieces_sent[0]]  # the chunks after it in the same read were buffered
            assert rest == BODY[100:]
            assert ends == []  # pull() dropped the end callback too: read() saw the end
            await body.aclose()
            await pool.aclose()
    run(scenario())


def test_push_is_refused_while_bytes_wait_unread(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(sized(b"hello"))
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            await eventually(lambda: body.ended)
            assert not body.push(lambda piece: None, lambda exc: None)
            assert await body.read() == b"hello"
            await body.aclose()
            await pool.aclose()
    run(scenario())


# 3. Keep-alive.

def test_sequential_requests_reuse_one_connection(run):
    async def handler(reader, writer, n):
        await answer_forever(reader, writer, sized(b"hello"))

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            for _ in range(3):
                response = await post(pool, server.url)
                assert await read_all(response.body) == b"hello"
                await response.body.aclose()
            assert server.accepted == 1
            await pool.aclose()
            await eventually(lambda: server.closed == 1, "the server seeing the pool's close")
            response = await post(pool, server.url)  # a closed pool still works: a new connection
            assert await read_all(response.body) == b"hello"
            await response.body.aclose()
            assert server.accepted == 2
            await pool.aclose()
    run(scenario())


def live(cls) -> int:
    return sum(type(o) is cls for o in gc.get_objects())


def test_a_finished_response_is_freed_without_the_cyclic_collector(run):
    # The body and its parser (which holds the body's callbacks), and the body and the future its headers came
    # through (whose result, the response, holds the body), referred to each other: every response outlived its
    # stream, with what hung off it, until the cyclic collector reached it (docs/performance.md, "Session 13").
    async def handler(reader, writer, n):
        if n == 0:
            await answer_forever(reader, writer, sized(b"hello"))
        else:  # a body the client leaves half read: its connection is closed
            await read_request(reader)
            writer.write(CHUNKED_HEAD + chunked(b"data: first\n\n")[:-5])
            await writer.drain()
            await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            gc.collect()
            before = live(WireBody), live(WireResponse)
            gc.disable()
            try:
                for _ in range(3):  # kept alive: the connection goes back to the pool
                    response = await post(pool, server.url)
                    assert await read_all(response.body) == b"hello"
                    await response.body.aclose()
                await pool.aclose()
                response = await post(pool, server.url)  # closed half read
                assert await response.body.read() == b"data: first\n\n"
                await response.body.aclose()
                await eventually(lambda: server.closed == 2, "the server seeing both connections close")
                del response
                await asyncio.sleep(0)
                assert (live(WireBody), live(WireResponse)) == before
            finally:
                gc.enable()
            await pool.aclose()
    run(scenario())


def test_a_body_not_read_to_its_end_closes_its_connection(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunked(b"data: first\n\n")[:-5])
        await writer.drain()
        assert await read_request(reader) == b""  # the client's close, while the body goes on

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert await response.body.read() == b"data: first\n\n"
            await response.body.aclose()
            await response.body.aclose()  # idempotent
            await eventually(lambda: server.closed == 1, "the server seeing the disconnect")
            with pytest.raises(httpx2.ReadError):
                await response.body.read()
            await pool.aclose()
    run(scenario())


def test_connection_close_and_unread_bytes_are_not_reused(run):
    async def handler(reader, writer, n):
        await answer_forever(reader, writer, sized(b"hello", b"Connection: close\r\n") if n == 0 else sized(b"hi"))

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"hello"
            await response.body.aclose()
            response = await post(pool, server.url)  # the server said close: a second connection
            await eventually(lambda: response.body.ended)
            await response.body.aclose()  # ended, but "hi" was never read: not reused either
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"hi"
            await response.body.aclose()
            assert server.accepted == 3
            await pool.aclose()
    run(scenario())


# 4. A connection lost mid-body.

def test_a_connection_lost_mid_chunk_is_a_read_error(run):
    go = []

    async def handler(reader, writer, n):
        await chunked_head(reader, writer)
        if n == 1:  # the second, pushed: the body once the client has called push()
            await eventually(lambda: go)
        writer.write(chunked(BODY[:200])[:150])  # mid-chunk, no terminating chunk

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            with pytest.raises(httpx2.ReadError):
                await read_all(response.body)
            await response.body.aclose()
            response = await post(pool, server.url)
            pieces, ends = [], []
            assert response.body.push(pieces.append, ends.append)
            go.append(True)
            await eventually(lambda: ends)
            assert len(ends) == 1 and isinstance(ends[0], httpx2.ReadError)
            assert b"".join(pieces) == BODY[:128]  # three whole chunks (43 bytes framed) and 17 bytes of the fourth
            await response.body.aclose()
            await pool.aclose()
    run(scenario())


def test_a_short_content_length_body_is_a_read_error_in_push_mode(run):
    go = []

    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        await writer.drain()
        await eventually(lambda: go)
        writer.write(b"x" * 60)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            pieces, ends = [], []
            assert body.push(pieces.append, ends.append)
            go.append(True)
            await eventually(lambda: ends)
            assert len(ends) == 1 and isinstance(ends[0], httpx2.ReadError)
            assert b"".join(pieces) == b"x" * 60
            await body.aclose()
            await pool.aclose()
    run(scenario())


# 5. Connect errors and malformed responses.

def test_a_refused_port_is_a_connect_error(run):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # bound, never listening: nothing accepts on it

    async def scenario():
        pool = WirePool()
        with pytest.raises(httpx2.ConnectError):
            await post(pool, httpx2.URL(f"http://127.0.0.1:{port}/v1"))
        with pytest.raises(httpx2.ConnectError):
            await post(pool, httpx2.URL("http://provider.invalid/v1"), connect_timeout=10)
        # A listening socket: only the (zero) timeout can fail the connect. The kernel completes the handshake
        # into its backlog; no server accepts it, so no server-side transport outlives the test's loop (one did,
        # with asyncio's server: an unclosed transport, collected in a later test).
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen(8)
            url = httpx2.URL(f"http://127.0.0.1:{listening.getsockname()[1]}/v1")
            with pytest.raises(httpx2.ConnectTimeout):
                await post(pool, url, connect_timeout=0)
    run(scenario())


def test_a_host_name_is_resolved_once_per_dns_ttl_and_connected_by_happy_eyeballs():
    """A provider named by a host name (api.openai.com's case; the other tests use addresses): two new connections
    within DNS_TTL resolve the name once. On asyncio's loop only, whose getaddrinfo can be wrapped to count calls."""
    async def scenario():
        loop = asyncio.get_running_loop()
        resolved = []
        getaddrinfo = loop.getaddrinfo

        async def counting(host, *args, **kwargs):
            resolved.append(host)
            return await getaddrinfo(host, *args, **kwargs)

        loop.getaddrinfo = counting
        async with Raw(lambda reader, writer, n: answer_forever(
                reader, writer, sized(b"hi", b"Connection: close\r\n"))) as server:
            pool = WirePool()
            url = httpx2.URL(f"http://localhost:{server.port}/v1/chat/completions")
            for _ in range(2):
                response = await post(pool, url)
                assert await read_all(response.body) == b"hi"
                await response.body.aclose()
            assert server.accepted == 2  # the server closed the first: a second connection
            assert resolved == ["localhost"]
            await pool.aclose()

    with asyncio.Runner() as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


def test_a_malformed_status_line_is_a_remote_protocol_error(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write([b"HTTQ/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", b"HTTP/1.1 20"][n])
        await writer.drain()

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            for _ in range(3):  # bad protocol, bad header, and a close before the status line's end
                with pytest.raises(httpx2.RemoteProtocolError):
                    await post(pool, server.url)
            assert server.accepted == 3  # new connections that failed are not retried
    run(scenario())


def test_interim_responses_are_skipped_and_bodiless_statuses_end_at_their_headers(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + sized(b"hi"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # HEAD: no body
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert (response.status, response.headers) == (200, [(b"content-length", b"2")])
            assert await read_all(response.body) == b"hi"
            await response.body.aclose()
            response = await post(pool, server.url)
            assert (response.status, response.reason, response.headers) == (204, "No Content", [(b"x-n", b"1")])
            assert await response.body.read() == b""
            await response.body.aclose()
            response = await pool.request("HEAD", server.url, headers(server.url), b"")
            assert response.status == 200 and await response.body.read() == b""
            await response.body.aclose()
            assert server.accepted == 1
            await pool.aclose()
    run(scenario())


# 6. A reused connection the server closed.

def test_a_reused_connection_closed_by_the_server_is_retried_on_a_new_one(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        if n == 0:
            writer.write(sized(b"first"))
            await read_request(reader)  # the second request arrives, and the server closes without answering
            return
        writer.write(sized(b"second"))
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"first"
            await response.body.aclose()
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"second"
            await response.body.aclose()
            assert server.accepted == 2
            await pool.aclose()
    run(scenario())


def test_an_idle_connection_the_server_closes_leaves_the_pool(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(sized(b"hello"))
        await writer.drain()

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"hello"
            await response.body.aclose()
            assert sum(map(len, pool._idle.values())) == 1
            await eventually(lambda: not any(pool._idle.values()), "the pool dropping the closed connection")
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"hello"
            await response.body.aclose()
            assert server.accepted == 2
            await pool.aclose()
    run(scenario())


def test_an_idle_connection_expires_after_keepalive(run):
    async def handler(reader, writer, n):
        await answer_forever(reader, writer, sized(b"hello"))

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool(keepalive=0.05)
            response = await post(pool, server.url)
            assert await read_all(response.body) == b"hello"
            await response.body.aclose()
            await eventually(lambda: server.closed == 1, "the expired connection's close")
            assert not any(pool._idle.values())
            await pool.aclose()
    run(scenario())


# 7. A close-delimited body.

def test_a_close_delimited_body_ends_cleanly_at_eof(run):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for n in range(0, len(BODY), 500):
            writer.write(BODY[n:n + 500])
            await writer.drain()
        # the handler returns: the server closes, which ends the body

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            response = await post(pool, server.url)
            assert await read_all(response.body) == BODY
            await response.body.aclose()
            response = await post(pool, server.url)
            ends = []
            if response.body.push(lambda piece: None, ends.append):
                await eventually(lambda: ends)
                assert ends == [None]
            await response.body.aclose()
            assert not any(pool._idle.values()) and server.accepted == 2
    run(scenario())


# 8. Pausing.

BIG = 8 * 1024 * 1024


def big_server(state):
    async def handler(reader, writer, n):
        await read_request(reader)
        state["transport"] = writer.transport
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
        await writer.drain()
        await eventually(lambda: "go" in state)
        writer.write(b"x" * BIG)
        await writer.drain()
        state["drained"] = True
        await read_request(reader)
    return handler


def test_pause_stops_the_socket_until_resume(run):
    state = {}

    async def scenario():
        async with Raw(big_server(state)) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            received, ends = [0], []

            def on_piece(piece):
                received[0] += len(piece)

            assert body.push(on_piece, ends.append)
            body.pause()
            state["go"] = True
            await eventually(lambda: state["transport"].get_write_buffer_size() > 0, "the server's writes blocking")
            seen = received[0]
            with pytest.raises(TimeoutError):  # not synchronisation: the drain must not complete while paused
                async with asyncio.timeout(0.2):
                    await eventually(lambda: "drained" in state)
            assert received[0] == seen < BIG
            body.resume()
            await eventually(lambda: ends)
            assert ends == [None] and received[0] == BIG
            await eventually(lambda: "drained" in state)
            await body.aclose()
            await pool.aclose()
    run(scenario())


def test_pull_mode_reads_ahead_only_so_far(run):
    state = {}

    async def scenario():
        async with Raw(big_server(state)) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            state["go"] = True
            await eventually(lambda: state["transport"].get_write_buffer_size() > 0, "the server's writes blocking")
            first = await body.read()
            assert len(first) < 1024 * 1024  # the read-ahead (32 KiB) and one socket read at most
            body.pause()  # the owner's hold outlasts the read-ahead's release
            with pytest.raises(TimeoutError):  # not synchronisation: nothing may arrive while paused
                async with asyncio.timeout(0.2):
                    await body.read()
            body.resume()
            assert len(first) + len(await read_all(body)) == BIG
            await eventually(lambda: "drained" in state)
            await body.aclose()
            await pool.aclose()
    run(scenario())


def test_pull_mode_reads_the_whole_big_body(run):
    state = {"go": True}

    async def scenario():
        async with Raw(big_server(state)) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            assert len(await read_all(body)) == BIG
            await body.aclose()
            await pool.aclose()
    run(scenario())


# 9. https.

def certificate():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provider.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("provider.test"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_https_with_a_trusted_certificate_and_server_hostname(run, tmp_path):
    cert, key = certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def scenario():
        runner, port = await aiohttp_server(stream_events, server_context)
        url = httpx2.URL(f"https://127.0.0.1:{port}/v1/chat/completions")
        pool = WirePool(ssl_context=ssl.create_default_context(cadata=cert.decode()))
        untrusting = WirePool()  # httpx2's context, made on its first request: the test's CA is not in it
        try:
            for _ in range(2):  # the second on the kept-alive TLS connection
                response = await post(pool, url, server_hostname="provider.test")
                assert response.status == 200 and await read_all(response.body) == BODY
                await response.body.aclose()
            with pytest.raises(httpx2.ConnectError):
                await post(pool, url, server_hostname="other.test")  # the certificate does not name it
            with pytest.raises(httpx2.ConnectError):
                await post(untrusting, url)
        finally:
            await pool.aclose()
            await runner.cleanup()
    run(scenario())


# 10. A failing callback.

def test_an_exception_from_on_piece_is_logged_and_fails_the_body(run, caplog):
    go = []

    async def handler(reader, writer, n):
        await chunked_head(reader, writer)
        await eventually(lambda: go)
        writer.write(chunked(b"data: boom\n\n")[:-5])
        await writer.drain()
        assert await read_request(reader) == b""  # the client closed the connection

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            ends = []

            def on_piece(piece):
                raise RuntimeError("the owner's bug")

            assert body.push(on_piece, ends.append)
            go.append(True)
            await eventually(lambda: ends)
            assert len(ends) == 1 and isinstance(ends[0], httpx2.ReadError) and body.ended
            await eventually(lambda: server.closed == 1, "the server seeing the close")
            await body.aclose()
            await pool.aclose()

    with caplog.at_level(logging.ERROR, logger="streaming.provider"):
        run(scenario())
    [record] = [r for r in caplog.records if r.name == "streaming.provider"]
    assert isinstance(record.exc_info[1], RuntimeError)


def test_an_exception_from_on_end_is_logged_and_the_connection_not_reused(run, caplog):
    go = []

    async def handler(reader, writer, n):
        await chunked_head(reader, writer)
        await eventually(lambda: go)
        writer.write(chunked(b"data: x\n\n"))
        await read_request(reader)

    async def scenario():
        async with Raw(handler) as server:
            pool = WirePool()
            body = (await post(pool, server.url)).body
            calls = []

            def on_end(exc):
                calls.append(exc)
                raise RuntimeError("the owner's bug")

            assert body.push(lambda piece: None, on_end)
            go.append(True)
            await eventually(lambda: calls)
            await body.aclose()
            await eventually(lambda: server.closed == 1, "the server seeing the close")
            assert calls == [None]
            await pool.aclose()

    with caplog.at_level(logging.ERROR, logger="streaming.provider"):
        run(scenario())
    assert any(isinstance(r.exc_info[1], RuntimeError) for r in caplog.records if r.name == "streaming.provider")
