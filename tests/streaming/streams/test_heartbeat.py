"""While the first token is awaited, the client gets its headers and SSE comments, so proxies keep the connection."""

import json

import pytest

from tests.support.gateways import gateway_server, settled_row
from tests.support.gateways import open_stream

pytestmark = pytest.mark.django_db(transaction=True)


def read_until(sock, marker, received=b""):
    while marker not in received:
        data = sock.recv(65536)
        assert data, f"closed before {marker!r}: {received[-300:]!r}"
        received += data
    return received


def test_heartbeats_flow_until_the_first_token(sim, make_user):
    caller = make_user()
    sim.control(ttft_seconds=3.5)  # the session gateway's STREAM_HEARTBEAT_INTERVAL is 1 s
    sock, request_id, head = open_stream(sim, caller.key, max_tokens=3)
    body = read_until(sock, b'"content":" ', head)
    before_first_token = body[:body.index(b'"content":" ')]
    assert before_first_token.count(b": keep-alive") >= 2
    read_until(sock, b"[DONE]", body)
    sock.close()
    assert settled_row(request_id).status == "completed"


def test_a_first_token_that_never_comes_ends_the_committed_stream(make_user):
    caller = make_user()
    with gateway_server(UPSTREAM_FIRST_TOKEN_TIMEOUT=2.5, UPSTREAM_RETRY_DEADLINE=0) as gateway:
        gateway.control(ttft_seconds=30)
        sock, request_id, head = open_stream(gateway, caller.key)
        body = read_until(sock, b'"error"', head)
        sock.close()
        event = next(json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b'data: {"error"'))
        assert event["error"]["code"] == "upstream_timeout"
        assert b": keep-alive" in body
        row = settled_row(request_id)
        assert (row.status, row.reason, row.completion_tokens) == ("upstream_error", "upstream_timeout", 0)
        # The provider's request was closed, not left generating.
        assert gateway.sim_request(request_id)["disconnected"]
