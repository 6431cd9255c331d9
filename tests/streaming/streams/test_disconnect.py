"""A client that goes away stops the upstream request within one second."""

import socket
import time

import pytest

from tests.support.gateways import eventually, open_stream, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def test_disconnect_mid_stream_closes_the_upstream(sim, make_user):
    caller = make_user()
    sim.control(tokens_per_second=50, default_tokens=1000)
    sock, request_id, head = open_stream(sim, caller.key)
    received = head
    while received.count(b'"content":" ') < 5:
        received += sock.recv(65536)
    sock.close()
    closed_at = time.monotonic()
    record = eventually(lambda: (r := sim.sim_request(request_id)) and r["disconnected"] and r, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    assert record["tokens_sent"] < 100 and not record["finished"]
    row = settled_row(request_id)
    assert row.status == "client_disconnected"
    # Charged for what was generated: the prompt and the tokens metered so far, never zero or the maximum.
    assert 5 <= row.completion_tokens <= record["tokens_sent"]
    assert row.prompt_tokens > 0 and not row.usage_reported


def test_disconnect_while_waiting_for_the_first_token(sim, make_user):
    caller = make_user()
    sim.control(ttft_seconds=30)
    sock, request_id, _ = open_stream(sim, caller.key)
    eventually(lambda: sim.sim_request(request_id), timeout=2)
    sock.close()
    closed_at = time.monotonic()
    eventually(lambda: sim.sim_request(request_id)["disconnected"], timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens) == ("client_disconnected", 0)


def test_disconnect_before_the_upstream_answers(sim, make_user):
    """The client leaves while the gateway is still waiting for the provider's headers."""
    from quotas.models import Usage

    caller = make_user()
    before = sim.stats()["attempts"]
    body = b'{"model": "sim-small", "messages": [{"role": "user", "content": "go"}]}'  # not streaming
    sim.control(ttft_seconds=30)
    sock = socket.create_connection(("127.0.0.1", sim.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + caller.key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    eventually(lambda: sim.stats()["attempts"] > before, timeout=2)
    sock.close()
    row = eventually(lambda: Usage.objects.filter(user=caller.user).exclude(status="streaming").first(), timeout=2)
    assert row.status == "client_disconnected"
    eventually(lambda: sim.stats()["requests"][-1]["disconnected"], timeout=1.0)
