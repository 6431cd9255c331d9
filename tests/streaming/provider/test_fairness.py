"""Fairness between users at the shared upstream, end to end: real gateway processes and a real provider process.

One user's never-read streams cannot keep the shared permits from another user (fair shares, and preemption of
streams whose clients stopped reading); one user's requests that the provider fails on or rejects cannot open the
circuit breaker for others, while failures of several users still do. docs/resilience.md, "Fairness".
"""

import asyncio
import json
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from django.test import override_settings

from bench.bench_fairness import MODELS, PROVIDER_COMMAND
from bench.servers import start_server
from quotas.store import reset_stores
from quotas.store.base import OUTCOME_OK
from streaming.provider.permits import Upstream
from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

BUSY_USER = {"requests_per_minute": 10_000, "concurrent_streams": 100, "max_tokens_per_request": 100_000,
             "tokens_per_day": 10**9, "tokens_per_month": 10**10}


@pytest.fixture(scope="module")
def provider():
    """The bench's provider (bench/bench_fairness.py): the simulator, `sim-flood` from a second one, `sim-poison`
    answered 500 and `sim-rejects` 400."""
    with start_server(PROVIDER_COMMAND) as server, httpx2.Client(base_url=server.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def upstream(provider):
    provider.post("/control/reset").raise_for_status()
    yield provider
    provider.post("/control/reset").raise_for_status()


def gateway_for(provider, **settings):
    return gateway_server(OPENAI_BASE_URL=str(provider.base_url) + "/v1", OPENAI_API_KEY="sk-test-upstream",
                          SLUICE_MODELS=MODELS, **settings)


def chat(gateway, key, model="sim-small", stream=True, max_tokens=3):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}
    return httpx2.post(gateway.api_url + "/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})


def never_read(gateway, key):
    """A streaming request from a client that never reads: small buffers, set before connecting, so that the
    gateway's writes block after ~100 KB and its relay pauses."""
    body = json.dumps({"model": "sim-flood", "stream": True, "max_tokens": 100_000,
                       "messages": [{"role": "user", "content": "go"}]}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    sock.connect(("127.0.0.1", gateway.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def flood_requests(provider):
    return provider.get("/stats").json()["flood"]["requests"]


def test_one_users_never_read_streams_do_not_starve_another_user(make_user, upstream):
    greedy, modest = make_user(**BUSY_USER), make_user()
    upstream.post("/flood/control", json={"token_padding": 200, "default_tokens": 100_000}).raise_for_status()
    # Four permits; a stream stalled for 1 s may be preempted; the stall cut-off (which would free the permits
    # after 30 s by default) is out of the way.
    settings = {"UPSTREAM_CONCURRENCY_MAX": 4, "UPSTREAM_QUEUE_TIMEOUT": 30, "UPSTREAM_PREEMPT_AFTER": 1,
                "STREAM_STALL_TIMEOUT": 300, "UPSTREAM_BREAKER_THRESHOLD": 0}
    with gateway_for(upstream, **settings) as gateway:
        sockets = [never_read(gateway, greedy.key) for _ in range(12)]
        try:
            # The greedy user holds every permit, and the provider's writes to all four streams are blocked: the
            # gateway stopped reading them because their clients do not read.
            eventually(lambda: sum(r["blocked_now"] for r in flood_requests(upstream)) == 4, timeout=30,
                       interval=0.1)
            # The modest user asks for two streams at once: its fair share is 2 of the 4 permits, so two of the greedy
            # user's stalled streams give theirs up (each once it has stalled for 1 s), well within the queue timeout
            # (10 s), after which the modest user would get 429 upstream_saturated.
            # Its streams last ~3 s (60 tokens at 20 tokens/s) so that both hold a permit at once, however slowly a
            # loaded machine gets to the second preemption.
            upstream.post("/control", json={"tokens_per_second": 20}).raise_for_status()
            started = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                responses = list(pool.map(lambda _: chat(gateway, modest.key, max_tokens=60), range(2)))
            for response in responses:
                assert response.status_code == 200, response.text
                assert response.text.rstrip().endswith("data: [DONE]")
            assert time.monotonic() - started < 15  # well within the queue timeout (30 s)
            upstream.post("/control", json={"tokens_per_second": 0}).raise_for_status()
            for _ in range(3):
                started = time.monotonic()
                response = chat(gateway, modest.key)
                assert response.status_code == 200, response.text
                assert time.monotonic() - started < 6
            # The gateway closed the preempted streams' provider requests (the provider learns of it when the
            # connection closes: poll, do not race it); the others still stream.
            eventually(lambda: sum(r["disconnected"] for r in flood_requests(upstream)) >= 2, timeout=10, interval=0.1)
            preempted = {r["client_request_id"] for r in flood_requests(upstream) if r["disconnected"]}
            # (streams that got the permits back stream again until their writes block: poll)
            eventually(lambda: sum(r["blocked_now"] for r in flood_requests(upstream)) >= 2, timeout=10, interval=0.1)
            # A preempted stream's client that reads again gets what was read, then the error event that says why.
            answered, _, _ = select.select(sockets, [], [], 0)  # the streams whose head came (the rest still wait)
            ended = 0
            for sock in answered:
                head, body = read_head(sock)
                request_id = re.search(rb"(?i)x-request-id: *(\S+)", head).group(1).decode()
                if request_id in preempted:  # (a stream still queued after 30 s was answered 429: not ours here)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    body = read_to_end(sock, body)
                    assert b'"code": "upstream_preempted"' in body and b'"content":' in body
                    row = settled_row(request_id)
                    assert (row.status, row.reason) == ("upstream_error", "upstream_preempted")
                    assert row.completion_tokens > 0
                    ended += 1
            assert ended == len(preempted)
        finally:
            for sock in sockets:
                sock.close()


@pytest.mark.redis
def test_stalled_streams_in_one_process_yield_to_a_user_waiting_in_another(make_user, upstream, redis_url):
    greedy, modest = make_user(**BUSY_USER), make_user()
    upstream.post("/flood/control", json={"token_padding": 200, "default_tokens": 100_000}).raise_for_status()
    settings = {"REDIS_URL": redis_url, "UPSTREAM_CONCURRENCY_MAX": 4, "UPSTREAM_QUEUE_TIMEOUT": 30,
                "UPSTREAM_PREEMPT_AFTER": 1, "STREAM_STALL_TIMEOUT": 300, "UPSTREAM_BREAKER_THRESHOLD": 0}
    with gateway_for(upstream, **settings) as one, gateway_for(upstream, **settings) as two:
        sockets = [never_read(one, greedy.key) for _ in range(6)]
        try:
            eventually(lambda: sum(r["blocked_now"] for r in flood_requests(upstream)) == 4, timeout=30,
                       interval=0.1)
            # The modest user's requests wait in the other process; the store tells the first that they wait. Two at
            # once, each ~3 s long (60 tokens at 20 tokens/s): its fair share, 2 of 4, so two streams give way.
            upstream.post("/control", json={"tokens_per_second": 20}).raise_for_status()
            started = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                responses = list(pool.map(lambda _: chat(two, modest.key, max_tokens=60), range(2)))
            for response in responses:
                assert response.status_code == 200, response.text
            assert time.monotonic() - started < 15  # well within the queue timeout (30 s)
            # The provider learns of each preempted stream when its connection closes: poll, do not race it.
            eventually(lambda: sum(r["disconnected"] for r in flood_requests(upstream)) >= 2, timeout=10, interval=0.1)
        finally:
            for sock in sockets:
                sock.close()


def read_head(sock):
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def read_to_end(sock, body):
    """The rest of a chunked body, to its last chunk (the gateway ends the response after its error event)."""
    while not body.endswith(b"\r\n0\r\n\r\n"):
        piece = sock.recv(65536)
        assert piece, body[-300:]
        body += piece
    return body


def test_one_users_failing_requests_do_not_open_the_breaker_for_others(make_user, upstream):
    failing, other, third, fourth = (make_user(**BUSY_USER) for _ in range(4))
    settings = {"UPSTREAM_BREAKER_THRESHOLD": 3, "UPSTREAM_BREAKER_COOLDOWN": 60, "UPSTREAM_BACKOFF_BASE": 0.05,
                "UPSTREAM_BACKOFF_MAX": 0.2, "UPSTREAM_RETRY_DEADLINE": 5, "UPSTREAM_RETRY_MAX_ATTEMPTS": 10}
    with gateway_for(upstream, **settings) as gateway:
        def attempts(model):
            return upstream.get("/stats").json()["attempts"].get(model, 0)

        # The provider rejects (400) five of one user's requests: its answers to a client's request, not failures.
        for _ in range(5):
            assert chat(gateway, failing.key, "sim-rejects").status_code == 400
        # It fails (500) on that user's next request, as on a body that crashes it: retried until the user's
        # third failure in a row opens the user's own breaker.
        response = chat(gateway, failing.key, "sim-poison")
        assert response.status_code == 503 and "your requests" in response.json()["error"]["message"], response.text
        assert attempts("sim-poison") == 3
        assert chat(gateway, failing.key).status_code == 503  # paused for that user only
        # Other users are served: the shared breaker stayed closed.
        for user in (other, third):
            for stream in (True, False):
                response = chat(gateway, user.key, stream=stream)
                assert response.status_code == 200, response.text

        # Failures of two users in one run still open the shared breaker: two of `other`'s count (its third
        # opens its own breaker), then one of `third`'s.
        assert chat(gateway, other.key, "sim-poison").status_code == 503
        response = chat(gateway, third.key, "sim-poison")
        assert response.status_code == 503 and "requests to it are paused" in response.json()["error"]["message"]
        assert attempts("sim-poison") == 3 + 3 + 1
        served = attempts("sim-small")
        response = chat(gateway, fourth.key)
        assert response.status_code == 503 and "requests to it are paused" in response.json()["error"]["message"]
        assert attempts("sim-small") == served  # refused without asking the provider


# The fair queue with fair shares, in-process -------------------------------------------------------------------


@pytest.fixture
def two_permits():
    with override_settings(SLUICE_COUNTER_STORE="quotas.store.memory.MemoryStore", UPSTREAM_CONCURRENCY_MAX=2,
                           UPSTREAM_CONCURRENCY_MIN=1, UPSTREAM_FAIR_SHARE=True, UPSTREAM_QUEUE_POLL_INTERVAL=5):
        reset_stores()
        yield
    reset_stores()


async def until(condition):
    while not condition():
        await asyncio.sleep(0)  # let the other tasks run up to their next wait


async def test_a_user_holding_its_share_passes_its_turn_in_the_queue(two_permits):
    upstream = Upstream("http://unit.test/v1")
    first = await upstream.acquire("a", "a1", 5)
    await upstream.acquire("a", "a2", 5)  # alone, a may hold both
    admitted = []

    async def request(user, holder):
        permit = await upstream.acquire(user, holder, 5)
        admitted.append(holder)
        return permit

    greedy = asyncio.create_task(request("a", "a3"))
    await until(lambda: upstream.queue.length == 1)
    modest = asyncio.create_task(request("b", "b1"))
    await until(lambda: upstream.queue.length == 2)
    await first.release(OUTCOME_OK)
    # a is first in line, but holds its share (one of two, with b waiting): the permit goes to b.
    await modest
    assert admitted == ["b1"] and not greedy.done()
    greedy.cancel()
