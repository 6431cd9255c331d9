"""Issue 15, finding 5: a body is not read before its key is checked, nor past the limit (streaming/gateway/intake.py,
streaming/server/intake.py), under Daphne with backpressure and under Uvicorn.

Read on raw sockets: the client sends the headers of a 100 MB body and then nothing, or keeps sending a chunked body
until an answer comes. Before, Daphne answered only once the whole body had arrived (and spooled it to disk) and
Django under Uvicorn read it all into a temporary file before the middleware's 401 or the view's 413.
"""

import json
import os
import select
import socket

import httpx2
import pytest

from tests.support.gateways import gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

HUGE = 100 * 1024 * 1024
CHAT = b'{"model": "sim-small", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def server(request, django_db_setup, django_db_blocker):
    with gateway_server(request.param, TMPDIR=_tmpdir(request.param), SERVER_BODY_TIMEOUT=2) as running:
        running.kind = request.param
        yield running


def _tmpdir(name):
    path = f"/tmp/sluice-intake-{os.getpid()}-{name}"
    os.makedirs(path, exist_ok=True)
    return path


def read_answer(sock, timeout=10.0):
    """The response (status, headers dict, body) — read until the server closes or the body is complete."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def headers_only(server, head: bytes):
    """Send a request's head, none of its body, and read the answer."""
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as sock:
        sock.sendall(head)
        return read_answer(sock)


def post_head(path, length=None, key=None, extra=b""):
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" % path
    if key:
        head += b"Authorization: Bearer %s\r\n" % key.encode()
    head += b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return head + extra + b"\r\n"


def error_code(answer, status):
    got, headers, body = answer
    assert got == status, answer
    assert headers["content-type"].startswith("application/json"), headers
    assert headers.get("x-request-id", "").startswith("req_"), headers
    return json.loads(body)["error"]["code"]


def test_no_key_is_refused_before_the_body_is_read(server):
    # Nothing of the 100 MB follows the headers: an answer at all means the server did not wait for the body.
    answer = headers_only(server, post_head(b"/v1/chat/completions", HUGE))
    assert error_code(answer, 401) == "invalid_api_key"


def test_a_wrong_key_is_refused_without_reading_the_body(server):
    # Under Uvicorn the intake authenticates before the body is read (401); the Daphne server refuses the size
    # before reading anything (413). Either way, no byte of the body was needed.
    answer = headers_only(server, post_head(b"/v1/chat/completions", HUGE, key="sk-sluice-not-a-real-key"))
    assert error_code(answer, 401 if server.kind == "uvicorn" else 413) in (
        "invalid_api_key", "request_too_large")


def test_a_declared_oversized_body_is_refused_unread(server, make_user):
    account = make_user()
    answer = headers_only(server, post_head(b"/v1/chat/completions", HUGE, key=account.key,
                                            extra=b"Expect: 100-continue\r\n"))
    assert error_code(answer, 413) == "request_too_large"


def test_a_chunked_body_is_cut_off_at_the_limit_not_read_in_full(server, make_user):
    from django.conf import settings

    account = make_user()
    sent = 0
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.sendall(post_head(b"/v1/chat/completions", key=account.key))
        piece = b" " * 65536
        chunk = memoryview(b"%x\r\n%s\r\n" % (len(piece), piece))
        answered, offset = False, 0
        while sent < HUGE:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                answered = True
                break
            assert writable, "the server neither reads nor answers"
            try:
                written = sock.send(chunk[offset:])
            except (BrokenPipeError, ConnectionResetError):
                answered = True
                break
            sent += written
            offset = (offset + written) % len(chunk)
        assert answered, "the server read the whole 100 MB body"
        answer = read_answer(sock)
    assert error_code(answer, 413) == "request_too_large"
    # The server answered once it had read past the limit; what the client got to send beyond it is what the
    # sockets' buffers held (a few MB on loopback), nowhere near the 100 MB.
    assert sent < settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 16 * 1024 * 1024, sent


def test_a_body_that_never_comes_gets_a_408(server, make_user):
    # Headers announcing 100 bytes, then 10 of them, then nothing: the server answers within SERVER_BODY_TIMEOUT
    # (2 s here) instead of holding the connection until the client gives up.
    account = make_user()
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=10) as sock:
        sock.sendall(post_head(b"/v1/chat/completions", 100, key=account.key) + b'{"model": ')
        answer = read_answer(sock, timeout=8)
    assert error_code(answer, 408) == "request_timeout"


def test_nothing_of_a_refused_body_stays_on_disk(server, make_user):
    account = make_user()
    headers_only(server, post_head(b"/v1/chat/completions", HUGE, key=account.key))
    pid = server.server.process.pid
    spooled = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(_tmpdir(server.kind)) or "(deleted)" in target:
                spooled.append((target, os.stat(f"/proc/{pid}/fd/{fd}").st_size))
        except FileNotFoundError:
            continue
    assert not [s for s in spooled if s[1] > 1024 * 1024], spooled


def test_a_small_body_with_a_good_key_is_served(server, make_user):
    account = make_user()
    response = httpx2.post(server.api_url + "/chat/completions", content=CHAT, timeout=10,
                           headers={"Authorization": f"Bearer {account.key}", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_what_is_not_http_gets_a_json_400():
    # Twisted's own refusals (before Daphne, before the application): JSON, not a bare status line.
    import sys

    from bench.servers import HOST, start_server

    argv = [sys.executable, "-m", "streaming.server", "-b", HOST, "-p", "{port}", "tests.support.asgi_apps:app"]
    with start_server(argv) as running:
        for head in (b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\nConnection: close\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-B@d: ab\r\nConnection: close\r\n\r\n",
                     b"POST /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            with socket.create_connection((HOST, running.port), timeout=10) as sock:
                sock.sendall(head)
                answer = read_answer(sock)
            assert error_code(answer, 400) == "bad_request"


def test_every_response_carries_a_request_id(server):
    # Issue 15, "every response carries x-request-id": the pages and probes too, not only /v1/ and /api/.
    for path in ("/healthz", "/readyz", "/admin/login/", "/v1/models", "/nowhere"):
        response = httpx2.get(server.base_url + path, timeout=10)
        assert response.headers.get("x-request-id", "").startswith("req_"), (path, response.status_code)
