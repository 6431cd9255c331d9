"""Backpressure end to end, through the whole gateway, under Daphne-with-backpressure and Uvicorn.

The client sets a 4 KiB receive buffer; the streams are tens of MB, far more than loopback's
autotuned socket buffers, so "the upstream is paused" cannot be mistaken for "it has finished".
"""

import json
import socket
import time

import pytest

from tests.support.gateways import eventually, gateway_server, plateau, settled_row

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

BIG = {"tokens_per_day": 10**9, "tokens_per_month": 10**9, "max_tokens_per_request": 10**6,
       "concurrent_streams": 2}
TOKENS = 200_000  # x ~260 bytes per event: ~50 MB
PADDING = 200


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def server(request, django_db_setup, django_db_blocker):
    with gateway_server(request.param, STREAM_STALL_TIMEOUT=3) as gateway:
        gateway.kind = request.param
        yield gateway


@pytest.fixture
def upstream(server):
    server.reset()
    server.control(default_tokens=TOKENS, token_padding=PADDING)
    yield server
    server.reset()


TCP_ESTABLISHED = 1  # tcpi_state, linux/tcp_states.h


def tcp_state(sock) -> int:
    """The kernel's TCP state of a socket (the first byte of TCP_INFO), read without reading its data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def request_stream(gateway, key, max_tokens=TOKENS, rcvbuf=4096):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", gateway.server.port))
    body = json.dumps({"model": "sim-small", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "go"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    head, _, rest = head.partition(b"\r\n\r\n")
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id"))
    return sock, request_id, rest


def test_a_stalled_reader_pauses_the_upstream(upstream, make_user):
    caller = make_user(**BIG)
    sock, request_id, _ = request_stream(upstream, caller.key)
    eventually(lambda: upstream.sim_request(request_id), timeout=5)
    produced = plateau(lambda: upstream.sim_request(request_id)["tokens_sent"], timeout=20)
    record = upstream.sim_request(request_id)
    # Held back: the provider wrote a small fraction of the stream, and its writes are blocked.
    assert produced < TOKENS / 4, produced
    assert record["blocked_now"] and not record["finished"]
    sock.close()
    eventually(lambda: upstream.sim_request(request_id)["disconnected"], timeout=1.0)
    assert settled_row(request_id).peak_buffered_bytes <= 64 * 1024 + 4096


def dechunk(raw: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer encoding."""
    parts, at = [], 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(raw[end + 2:end + 2 + size])
        at = end + 2 + size + 2


def test_a_slow_reader_gets_every_byte_in_order_and_keeps_its_connection(upstream, make_user):
    from streaming.simulator.app import WORDS

    caller = make_user(**BIG)
    # ~6 MB, more than the kernel's 4 MB send buffer, read 4 KiB every 2 ms: the gateway is held back
    tokens = 24_000
    sock, request_id, body = request_stream(upstream, caller.key, max_tokens=tokens)
    chunks = [body]
    while not (chunks[-1].endswith(b"0\r\n\r\n") and b"[DONE]" in b"".join(chunks[-3:])):
        data = sock.recv(4096)
        assert data, "connection closed early"
        chunks.append(data)
        time.sleep(0.002)  # the slow reader under test, not a synchronisation
    payload = dechunk(b"".join(chunks))
    events = [json.loads(line[6:]) for line in payload.split(b"\n")
              if line.startswith(b"data: {") and b'"choices":[{' in line]
    padded = [(e["choices"][0]["delta"]["content"], e["obfuscation"]) for e in events if e.get("obfuscation")]
    assert len(padded) == tokens
    # The padding rides in each chunk's `obfuscation` field (as OpenAI's does): bytes, not tokens.
    assert padded == [(f" {WORDS[i % len(WORDS)]}", "." * PADDING) for i in range(tokens)]
    row = settled_row(request_id)
    assert row.status == "completed" and row.completion_tokens == tokens and row.backpressure_pauses > 0

    # Keep-alive: the connection that was paused again and again serves the next request.
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + caller.key.encode()
                 + b"\r\n\r\n")
    reply = b""
    while b"sim-large" not in reply:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    sock.close()


def test_a_stalled_reader_is_cut_off_and_releases_everything(upstream, make_user):
    caller = make_user(**{**BIG, "concurrent_streams": 1})
    sock, request_id, _ = request_stream(upstream, caller.key)
    row = settled_row(request_id, timeout=15)  # STREAM_STALL_TIMEOUT is 3 s on this server
    assert row.status == "client_stalled"
    assert row.completion_tokens > 0
    eventually(lambda: upstream.sim_request(request_id)["disconnected"], timeout=2)
    if upstream.kind == "daphne":
        # The server drops the connection of a client that never reads again: its handler is cancelled, and
        # BackpressureServer aborts the response it left unfinished; no task, buffer or socket stays for it. (The
        # cut-off used to settle first, and the settlement stopped the watchdog before it cancelled the handler: the
        # connection stayed ESTABLISHED for as long as the client kept it.) Uvicorn, whose handler is cancelled too,
        # closes the connection gracefully, i.e. once the client has read what its transport holds
        # (docs/backpressure.md, "Running on Uvicorn instead").
        eventually(lambda: tcp_state(sock) != TCP_ESTABLISHED, timeout=5)
    # The concurrency slot is free again: a second stream (limit 1) is admitted.
    sock2, request_id2, _ = request_stream(upstream, caller.key, max_tokens=5, rcvbuf=65536)
    sock2.close()
    sock.close()
