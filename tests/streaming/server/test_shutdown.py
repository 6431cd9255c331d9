"""streaming/server/shutdown.py: SIGTERM drains a real gateway process: no new connections, running requests finish
within SHUTDOWN_DRAIN_SECONDS, the rest end with a final error event and are settled."""

import json
import signal
import socket

import pytest

from tests.support.gateways import eventually, gateway_server, open_stream, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def read_to_end(sock):
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_sigterm_lets_short_streams_finish_and_ends_long_ones_with_an_error_event(make_user):
    caller = make_user(concurrent_streams=5)
    with gateway_server(SHUTDOWN_DRAIN_SECONDS=3) as gateway:
        gateway.control(tokens_per_second=20, default_tokens=1000)
        long_sock, long_id, long_head = open_stream(gateway, caller.key, max_tokens=1000)  # 50 s: longer than the drain
        short_sock, short_id, short_head = open_stream(gateway, caller.key, max_tokens=20)  # 1 s: finishes within it
        gateway.server.process.send_signal(signal.SIGTERM)
        # New connections are refused at once; the running streams go on.
        eventually(lambda: _refused(gateway.server.port), timeout=5)
        short = short_head + read_to_end(short_sock)
        assert b"data: [DONE]" in short and short.count(b'"content":" ') == 20
        long = long_head + read_to_end(long_sock)
        events = [line[6:].rstrip(b"\r") for line in long.split(b"\n") if line.startswith(b"data: ")]
        assert events, long[-500:]
        last = json.loads(events[-1]) if events[-1] != b"[DONE]" else {"done": long[-600:]}
        assert "error" in last, (long[-800:], gateway.server.stderr_text()[-3000:])
        assert last["error"]["code"] == "server_shutdown"
        delivered = long.count(b'"content":" ')
        assert 20 < delivered < 1000  # it streamed during the drain, and was cut at its end
        assert gateway.server.process.wait(timeout=15) is not None
        long_sock.close()
        short_sock.close()
    row = settled_row(long_id)
    assert (row.status, row.reason, row.completion_tokens) == ("worker_lost", "server_shutdown", delivered)
    assert settled_row(short_id).status == "completed"


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False
