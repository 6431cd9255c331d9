"""What a stream holds while its answer streams, on a real gateway process (Daphne with Sluice's server, Django, the
provider a simulator in a process of its own): none of its request's body, and none of its HTTP headers.

The request's body used to be kept twice for the stream's whole life: in Twisted's request (`Request.content`, read
by Daphne into the application's messages and never again) and in Django's request (`request.body`, parsed once by
the view). A conversation of tens of kilobytes cost that much more a stream (docs/performance.md, "A request's
body"). The Twisted request also kept the request's headers (copied into the ASGI scope) and the response's
(written with the head).

The gateway runs with a `sitecustomize` (on its PYTHONPATH) that traces allocations and, on SIGUSR2, writes the
memory traced and the headers of every Twisted request alive to a file.
"""

import json
import os
import signal
import socket
import sys
from contextlib import ExitStack

import pytest

from bench.common import simulator
from tests.support.gateways import eventually, gateway_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

REPORT = r'''
import gc, json, os, signal, tracemalloc

tracemalloc.start()


def _report(signum, frame):
    from twisted.web.http import Request
    gc.collect()
    requests = [r for r in gc.get_objects() if isinstance(r, Request)]
    report = {"traced": tracemalloc.get_traced_memory()[0], "requests": [
        {"request_headers": len(list(r.requestHeaders.getAllRawHeaders())),
         "response_headers": len(list(r.responseHeaders.getAllRawHeaders())),
         "started": bool(r.startedWriting), "finished": bool(r.finished)} for r in requests]}
    path = os.environ["SLUICE_TEST_MEMORY"]
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR2, _report)
'''

STREAMS = 8
PROMPT_BYTES = 64_000  # under Twisted's 100 KB, past which its copy is a temporary file rather than memory


@pytest.fixture(scope="module")
def provider():
    with simulator(tokens_per_second=5) as sim:  # slow: every stream stays open while it is measured
        yield sim


def prompt(size):
    return ("the quick brown fox jumps over a lazy dog while " * (size // 48 + 1))[:size]


def open_stream(port, key, content) -> socket.socket:
    """A streamed chat completion on a raw connection, read up to its first token: the request is admitted, its
    body parsed and its provider asked, and its response under way. The connection stays open (the caller closes
    it)."""
    body = json.dumps({"model": "sim-small", "stream": True, "max_tokens": 500,
                       "messages": [{"role": "user", "content": content}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    received = b""
    while b"data: {" not in received:
        chunk = sock.recv(65536)
        assert chunk, received[:300]
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    return sock


def measured(pid, report):
    if report.exists():
        report.unlink()
    os.kill(pid, signal.SIGUSR2)
    return eventually(lambda: report.exists() and json.loads(report.read_text()), timeout=30)


def test_a_stream_holds_neither_its_request_body_nor_its_headers(tmp_path, make_user, provider):
    (tmp_path / "sitecustomize.py").write_text(REPORT)
    report = tmp_path / "memory.json"
    caller = make_user(concurrent_streams=4 * STREAMS, requests_per_minute=1000, tokens_per_day=10_000_000,
                       tokens_per_month=100_000_000)
    with gateway_server(PYTHONPATH=str(tmp_path), SLUICE_TEST_MEMORY=str(report),
                        OPENAI_BASE_URL=f"http://127.0.0.1:{provider.port}/v1",
                        OPENAI_API_KEY="sk-test-upstream") as gateway, ExitStack() as streams:
        port, pid = gateway.server.port, gateway.server.process.pid
        for _ in range(2):  # the process's first requests: its caches, its provider connections
            streams.enter_context(open_stream(port, caller.key, prompt(PROMPT_BYTES)))
        idle = measured(pid, report)["traced"]
        for _ in range(STREAMS):
            streams.enter_context(open_stream(port, caller.key, "Say something."))
        short = measured(pid, report)
        for _ in range(STREAMS):
            streams.enter_context(open_stream(port, caller.key, prompt(PROMPT_BYTES)))
        long = measured(pid, report)

    per_short = (short["traced"] - idle) / STREAMS
    per_long = (long["traced"] - short["traced"]) / STREAMS
    # The instrument works: a stream holds something (its relay, its connections, Django's request).
    assert per_short > 10_000, (idle, short["traced"])
    # A long conversation costs a stream no more than a short one, give or take a small part of the prompt (each
    # copy of the body kept would be the whole of it).
    print(f"{per_short:,.0f} bytes a stream; {per_long:,.0f} with {PROMPT_BYTES:,}-byte prompts", file=sys.stderr)
    assert per_long - per_short < PROMPT_BYTES / 4, (per_short, per_long)
    streaming = [r for r in long["requests"] if r["started"] and not r["finished"]]
    assert len(streaming) >= 2 * STREAMS, long["requests"]
    assert all(r["request_headers"] == 0 and r["response_headers"] == 0 for r in streaming), streaming
