"""streaming/server/backpressure.py: what the Daphne server itself writes around the app's answer.

Read on raw sockets: the status line's reason phrase (Twisted's table lacks some codes, 429 among them), and a POST
body Twisted would parse and refuse on its own (a malformed multipart form) reaching the application instead.
"""

import socket
import sys

import pytest

from bench.servers import HOST, start_server

pytestmark = pytest.mark.django_db(transaction=True)


def exchange(port, request: bytes) -> bytes:
    """Send one request (ending with Connection: close) and read until the server closes."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def status_line(port, request: bytes) -> str:
    return exchange(port, request).split(b"\r\n", 1)[0].decode("latin-1")


def test_every_status_line_carries_its_reason_phrase(sim, make_user):
    account = make_user(requests_per_minute=1)
    body = b'{"model": "sim-small", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
               % (account.key.encode(), len(body), body))
    assert status_line(sim.server.port, request) == "HTTP/1.1 200 OK"
    assert status_line(sim.server.port, request) == "HTTP/1.1 429 Too Many Requests"
    assert status_line(sim.server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") \
        == "HTTP/1.1 401 Unauthorized"


def test_a_malformed_multipart_body_reaches_the_application():
    # Twisted parses form bodies for request.args, which Daphne never reads, and answers a bare 400 (no content type,
    # no body) to one it cannot parse: the application must see the request and answer it.
    server_argv = [sys.executable, "-m", "streaming.server", "-b", HOST, "-p", "{port}", "tests.support.asgi_apps:app"]
    body = b"--x\r\nnot a part\r\n"
    with start_server(server_argv) as server:
        answer = exchange(server.port, b"POST /elsewhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data"
                                       b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found") and content == b"not found"  # the app's own answer
