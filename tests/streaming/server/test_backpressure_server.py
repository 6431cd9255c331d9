"""streaming/server/backpressure.py: Daphne with HTTP backpressure, tested end to end on real server processes.

Each server runs ``tests.support.asgi_apps:app`` in a subprocess; the tests speak raw HTTP/1.1 (and one WebSocket) over
loopback sockets and read how much the app has produced from its ``/stats`` endpoint on a separate connection.
Stalled clients set a small SO_RCVBUF before connecting: loopback buffers otherwise autotune to several MB, and
the streams (64 MiB) are much larger than what the kernel can hold in any case.
"""

import base64
import hashlib
import os
import subprocess
import sys

import pytest

from bench.servers import HOST, PROJECT_ROOT, start_server
from tests.support.raw_http import (
    CHUNK_BYTES, SMALL_RCVBUF, RawHTTPConnection, assert_stream_body, get_stats, stream_path, wait_for,
    wait_for_plateau,
)

APP = "tests.support.asgi_apps:app"
PATCHED_DAPHNE = [sys.executable, "-m", "streaming.server", "-v", "2", "-b", HOST, "-p", "{port}", APP]
STOCK_DAPHNE = [sys.executable, "-m", "daphne", "-b", HOST, "-p", "{port}", APP]
UVICORN = [sys.executable, "-m", "uvicorn", "--host", HOST, "--port", "{port}", "--log-level", "warning", "--loop",
           "asyncio", APP]

BIG_STREAM_CHUNKS = 4096  # 64 MiB
BIG_STREAM_BYTES = BIG_STREAM_CHUNKS * CHUNK_BYTES
# With flow control a stalled stream stops at what the kernel and one Twisted/asyncio write buffer can hold
# (~2 MB measured on loopback); anything near this bound means the server is buffering the stream.
STALLED_LIMIT_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def patched_server():
    """One BackpressureServer for the module, at -v 2 so Twisted's own log lands in its stderr."""
    with start_server(PATCHED_DAPHNE) as server:
        yield server


def stall_big_stream(port, stream_id):
    """Request 64 MiB on a small-window socket, read nothing, return (connection, stats at the plateau)."""
    connection = RawHTTPConnection(port, rcvbuf=SMALL_RCVBUF)
    connection.send_get(stream_path(stream_id, BIG_STREAM_CHUNKS))
    return connection, wait_for_plateau(port, stream_id)


# (a) A client that stops reading stops the app.

@pytest.mark.timeout(60)
def test_stalled_reader_pauses_the_app_and_resumes_it(patched_server):
    connection, stats = stall_big_stream(patched_server.port, "stall")
    with connection:
        assert stats["state"] == "running"
        assert 0 < stats["produced_bytes"] < STALLED_LIMIT_BYTES, stats

        status, _ = connection.read_head()
        assert status == 200
        assert_stream_body(connection.read_body(), "stall", BIG_STREAM_CHUNKS)
    assert get_stats(patched_server.port, "stall") == {"produced_bytes": BIG_STREAM_BYTES, "state": "done"}


# The event loop (streaming/server/reactor.py): uvloop's by default, asyncio's on request; backpressure on both.

def test_the_server_runs_on_uvloop_by_default(patched_server):
    assert "Event loop: uvloop.Loop" in patched_server.stderr_text()


@pytest.mark.timeout(60)
def test_on_asyncios_loop_a_stalled_reader_pauses_the_app_too():
    with start_server(PATCHED_DAPHNE, env={"SLUICE_EVENT_LOOP": "asyncio"}) as server:
        assert "Event loop: asyncio." in server.stderr_text()
        connection, stats = stall_big_stream(server.port, "stall-asyncio")
        with connection:
            assert 0 < stats["produced_bytes"] < STALLED_LIMIT_BYTES, stats
            assert connection.read_head()[0] == 200
            assert_stream_body(connection.read_body(), "stall-asyncio", BIG_STREAM_CHUNKS)


@pytest.mark.timeout(60)
def test_stock_daphne_buffers_the_whole_stream_for_a_stalled_reader():
    """The problem the subclass fixes: stock Daphne's send() never waits."""
    with start_server(STOCK_DAPHNE) as server:
        connection, stats = stall_big_stream(server.port, "stock")
        connection.close()
    assert stats == {"produced_bytes": BIG_STREAM_BYTES, "state": "done"}


@pytest.mark.timeout(60)
def test_uvicorn_pauses_the_app_for_a_stalled_reader():
    """The supported alternative server has flow control of its own."""
    with start_server(UVICORN) as server:
        connection, stats = stall_big_stream(server.port, "uvicorn")
        connection.close()
    assert stats["state"] == "running"
    assert 0 < stats["produced_bytes"] < STALLED_LIMIT_BYTES, stats


@pytest.mark.timeout(60)
def test_closing_a_stalled_client_releases_the_waiting_send(patched_server):
    connection, stats = stall_big_stream(patched_server.port, "abandoned")
    assert stats["state"] == "running"
    connection.close()
    # Released by protocol_disconnected, not by Daphne cancelling the app 10 s later (the app would stay
    # "running"); later sends to the closed connection return at once.
    wait_for(lambda: get_stats(patched_server.port, "abandoned")["state"] == "done",
             "the abandoned stream's app to finish", timeout_seconds=5)


@pytest.mark.timeout(60)
def test_a_response_finished_by_the_server_releases_the_waiting_send():
    """Daphne's --http-timeout finishes the request while its app waits on a full socket; the connection is
    still open, so only protocol_disconnected can let the app go (it would stay "running" until cancelled)."""
    with start_server([*PATCHED_DAPHNE[:-1], "--http-timeout", "1", APP]) as server:
        connection = RawHTTPConnection(server.port, rcvbuf=SMALL_RCVBUF)
        with connection:
            connection.send_get(stream_path("timed-out", BIG_STREAM_CHUNKS))
            wait_for(lambda: get_stats(server.port, "timed-out") == {"produced_bytes": BIG_STREAM_BYTES,
                                                                     "state": "done"},
                     "the timed-out stream's app to finish", timeout_seconds=8)


# (b) Flow control loses nothing.

@pytest.mark.timeout(60)
def test_slow_reader_receives_every_byte_in_order(patched_server):
    chunks = 2048  # 32 MiB through an 8 KiB receive window, read in small pieces with two stalls
    with RawHTTPConnection(patched_server.port, rcvbuf=SMALL_RCVBUF) as connection:
        connection.send_get(stream_path("slow", chunks))
        assert connection.read_head()[0] == 200
        body = bytearray()
        for _ in range(2):
            body += connection.read_body(max_bytes=4 * 1024 * 1024)
            assert wait_for_plateau(patched_server.port, "slow")["state"] == "running"
        while piece := connection.read_body(max_bytes=4096):
            body += piece
    assert_stream_body(bytes(body), "slow", chunks)


# (c) Keep-alive and pipelining.

@pytest.mark.timeout(60)
def test_keep_alive_after_a_paused_and_resumed_stream(patched_server):
    chunks = 1024  # 16 MiB
    with RawHTTPConnection(patched_server.port, rcvbuf=SMALL_RCVBUF) as connection:
        connection.send_get(stream_path("keepalive-1", chunks))
        status, headers = connection.read_head()
        assert status == 200 and headers.get("connection") != "close"
        first = connection.read_body(max_bytes=1024 * 1024)
        paused = wait_for_plateau(patched_server.port, "keepalive-1")
        assert paused["state"] == "running" and paused["produced_bytes"] < STALLED_LIMIT_BYTES
        assert_stream_body(first + connection.read_body(), "keepalive-1", chunks)

        connection.send_get(stream_path("keepalive-2", 8, size=100))
        status, _, second = connection.read_response()
    assert status == 200
    assert_stream_body(second, "keepalive-2", 8, size=100)


@pytest.mark.timeout(60)
def test_pipelined_requests_both_stream_through_a_paused_connection(patched_server):
    # Twisted builds the second request inside the first one's finish(), while the first's gate is still
    # registered on the channel; both responses are big enough to pause.
    chunks = 512  # 8 MiB each
    with RawHTTPConnection(patched_server.port, rcvbuf=SMALL_RCVBUF) as connection:
        connection.send_get(stream_path("pipelined-1", chunks), stream_path("pipelined-2", chunks))
        status, _ = connection.read_head()
        first = connection.read_body(max_bytes=1024 * 1024)
        assert wait_for_plateau(patched_server.port, "pipelined-1")["state"] == "running"
        assert status == 200
        assert_stream_body(first + connection.read_body(), "pipelined-1", chunks)
        status, _, second = connection.read_response()
    assert status == 200
    assert_stream_body(second, "pipelined-2", chunks)
    assert get_stats(patched_server.port, "pipelined-2")["state"] == "done"


# (d) Twisted stays quiet about producers.

def _complete_small_requests(port, prefix):
    """A plain request, a keep-alive pair, a pipelined pair, and a client gone mid-response."""
    with RawHTTPConnection(port) as connection:
        connection.send_get(stream_path(f"{prefix}-plain", 4, size=100), close=True)
        assert connection.read_response()[0] == 200
    with RawHTTPConnection(port) as connection:
        for name in ("keepalive-a", "keepalive-b"):
            connection.send_get(stream_path(f"{prefix}-{name}", 4, size=100))
            assert connection.read_response()[0] == 200
        connection.send_get(stream_path(f"{prefix}-pipe-a", 4, size=100), stream_path(f"{prefix}-pipe-b", 4, 100))
        assert connection.read_response()[0] == connection.read_response()[0] == 200
    with RawHTTPConnection(port, rcvbuf=SMALL_RCVBUF) as connection:
        connection.send_get(stream_path(f"{prefix}-gone", 1024))
        wait_for(lambda: get_stats(port, f"{prefix}-gone"), "the stream to start")
    wait_for(lambda: get_stats(port, f"{prefix}-gone")["state"] == "done", "the abandoned stream to end")


@pytest.mark.timeout(60)
def test_no_producer_was_not_unregistered_in_the_server_log(patched_server):
    _complete_small_requests(patched_server.port, "quiet")
    log = patched_server.stderr_text()
    assert "HTTP response complete" in log  # -v 2 really logs
    assert "Producer was not unregistered" not in log
    assert "CRITICAL" not in log and "Traceback" not in log, log[-3000:]


PRODUCER_ON_REQUEST = """
from daphne.cli import CommandLineInterface
from daphne.http_protocol import WebRequest
from daphne.server import Server
from streaming.server.backpressure import ResponseGate

class ProducerOnRequest(Server):
    def protocol_connected(self, protocol):
        super().protocol_connected(protocol)
        if isinstance(protocol, WebRequest):
            protocol.registerProducer(ResponseGate(protocol.channel), True)

CommandLineInterface.server_class = ProducerOnRequest
CommandLineInterface.entrypoint()
"""


@pytest.mark.timeout(60)
def test_a_producer_on_the_request_would_show_in_that_log():
    """The check above can fail: registering the gate on the Request instead logs CRITICAL per request."""
    argv = [sys.executable, "-c", PRODUCER_ON_REQUEST, "-v", "2", "-b", HOST, "-p", "{port}", APP]
    with start_server(argv) as server:
        with RawHTTPConnection(server.port) as connection:
            connection.send_get(stream_path("on-request", 4, size=100), close=True)
            assert connection.read_response()[0] == 200
        wait_for(lambda: "Producer was not unregistered" in server.stderr_text(), "the CRITICAL log line")


# (e) WebSocket upgrades are untouched.

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _masked_frame(opcode, payload):
    """A client frame: FIN, the opcode, a short masked payload (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    assert len(payload) < 126
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


@pytest.mark.timeout(60)
def test_websocket_echo_works_while_another_connection_is_paused(patched_server):
    stalled, stats = stall_big_stream(patched_server.port, "beside-websocket")
    with stalled, RawHTTPConnection(patched_server.port) as connection:
        assert stats["state"] == "running"
        key = base64.b64encode(os.urandom(16))
        connection.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (HOST.encode(), patched_server.port, key))
        head = connection.read_until(b"\r\n\r\n").decode("latin-1")
        assert head.startswith("HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest()).decode()
        assert f"sec-websocket-accept: {accept.lower()}" in head.lower()

        connection.sock.sendall(_masked_frame(0x1, b"hello sluice"))
        first_byte, length = connection.read_exactly(2)
        assert (first_byte, length) == (0x81, len(b"hello sluice"))  # FIN + text, unmasked
        assert connection.read_exactly(length) == b"hello sluice"
        connection.sock.sendall(_masked_frame(0x8, (1000).to_bytes(2, "big")))


# Wiring.

def _run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.timeout(60)
def test_entry_points_use_the_backpressure_server():
    result = _run_python(
        "import django; from django.conf import settings; settings.configure(); django.setup()\n"
        "from streaming.server.backpressure import BackpressureServer\n"
        "from streaming.server.__main__ import BackpressureCommandLineInterface\n"
        "from streaming.management.commands.runserver import Command\n"
        "assert BackpressureCommandLineInterface.server_class is BackpressureServer\n"
        "assert Command.server_cls is BackpressureServer\n")
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)
def test_django_setup_installs_the_reactor_on_uvloop_before_daphne_does():
    # runserver imports daphne.server through Daphne's app: the streaming app, listed first, installs it first.
    result = _run_python(
        "import django; from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['streaming', 'daphne']); django.setup()\n"
        "from streaming.server import reactor\n"
        "print(type(reactor.installed_loop()).__module__)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "uvloop"


@pytest.mark.timeout(60)
def test_warns_when_daphne_is_not_the_tested_version():
    tested = _run_python("import warnings; warnings.simplefilter('error'); import streaming.server.backpressure")
    assert tested.returncode == 0, tested.stderr
    other = _run_python("import daphne; daphne.__version__ = '9.9'; import streaming.server.backpressure")
    assert "tested against daphne 4.2.3, but daphne 9.9 is installed" in other.stderr
