"""Resilience to the provider, end to end: real gateway processes, the simulated upstream over real HTTP.

Retries before the first byte (429, 5xx, first-token timeouts) within the deadline; none after it; the circuit
breaker; the fair queue; one limit shared by several processes; no internals in any error. docs/resilience.md.
"""

import asyncio
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from django.test import override_settings

from quotas.store import reset_stores
from quotas.store.base import OUTCOME_FAILED, OUTCOME_OK
from streaming.provider.permits import Upstream
from tests.support.gateways import eventually, gateway_server, settled_row
from bench.servers import start_server

pytestmark = pytest.mark.django_db(transaction=True)

# Short waits, so that the tests see several retries quickly. Every gateway states what it relies on.
FAST = {"UPSTREAM_BACKOFF_BASE": 0.05, "UPSTREAM_BACKOFF_MAX": 0.5, "UPSTREAM_RETRY_MAX_ATTEMPTS": 10,
        "UPSTREAM_BREAKER_THRESHOLD": 0, "UPSTREAM_CONCURRENCY_MAX": 64, "UPSTREAM_RETRY_DEADLINE": 5}
UPSTREAM_KEY = "sk-test-upstream-secret"
BUSY_USER = {"requests_per_minute": 10_000, "concurrent_streams": 100}


def chat(gateway, key, stream=False, max_tokens=3, timeout=60):
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}
    return httpx2.post(gateway.api_url + "/chat/completions", json=body, timeout=timeout,
                       headers={"Authorization": f"Bearer {key}"})


def error_of(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert_clean(response.text)
    return error


def assert_clean(text, *secrets):
    """No internal address, provider key or stack trace in what a client sees."""
    for leak in ("127.0.0.1", "localhost", "/_sim", "Traceback", UPSTREAM_KEY, *secrets):
        assert leak not in text, (leak, text)


def contents(response):
    """The content deltas of an SSE body, and whether it ended with [DONE]."""
    tokens, done = [], False
    for line in response.content.split(b"\n"):
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            chunk = json.loads(line[6:])
            tokens += [c["delta"]["content"] for c in chunk.get("choices", []) if c["delta"].get("content")]
    return tokens, done


def queued(gateway):
    """How many requests this gateway has queued for an upstream permit (it logs each one at DEBUG)."""
    return gateway.server.stderr_text().count("upstream saturated: ")


def send_and_hold(gateway, key):
    """A streaming request on a raw socket, left open: the test closes it to make the client go away."""
    body = json.dumps({"model": "sim-small", "stream": True, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "go"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return sock


# Retries before the first byte -----------------------------------------------------------------------------


def test_429s_are_retried_until_every_request_succeeds(make_user):
    caller = make_user(**BUSY_USER)
    with gateway_server(**FAST) as gateway:
        gateway.control(fail_429_rate=0.3, retry_after_seconds=0.05)
        client = openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0)
        for i in range(30):
            started = time.monotonic()
            if i % 2:
                text = client.chat.completions.create(model="sim-small", max_tokens=3,
                                                      messages=[{"role": "user", "content": "hi"}])
                assert text.choices[0].message.content == " the quick brown"
            else:
                stream = client.chat.completions.create(model="sim-small", max_tokens=3, stream=True,
                                                        messages=[{"role": "user", "content": "hi"}])
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == " the quick brown"
            assert time.monotonic() - started < FAST["UPSTREAM_RETRY_DEADLINE"], gateway.server.stderr_text()
        stats = gateway.stats()
    # The simulator's random draws are seeded: some 429s happened, each one retried.
    assert stats["rejected_429"] >= 5
    assert stats["attempts"] == 30 + stats["rejected_429"], {k: v for k, v in stats.items() if k != "requests"}


@pytest.mark.parametrize("stream", [True, False])
def test_a_provider_that_keeps_saying_429_gives_the_client_429_within_the_deadline(make_user, stream):
    caller = make_user()
    with gateway_server(**{**FAST, "UPSTREAM_RETRY_DEADLINE": 1.5}) as gateway:
        gateway.control(fail_429_rate=1.0, retry_after_seconds=0.05)
        started = time.monotonic()
        response = chat(gateway, caller.key, stream=stream)
        elapsed = time.monotonic() - started
        attempts = gateway.stats()["attempts"]
    error = error_of(response, 429, "upstream_rate_limited")
    assert "rate limiting" in error["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 1.5 + 2.0  # the deadline, and slack for a loaded machine (the default deadline is 20 s)
    # Bounded by the deadline and UPSTREAM_RETRY_MAX_ATTEMPTS; retried, not given up at once.
    assert 2 <= attempts <= 10
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.reason, row.completion_tokens) == ("upstream_error", "upstream_rate_limited", 0)


def test_no_retries_when_the_deadline_is_zero(make_user):
    caller = make_user()
    with gateway_server(**{**FAST, "UPSTREAM_RETRY_DEADLINE": 0}) as gateway:
        gateway.control(fail_500_rate=1.0)
        error_of(chat(gateway, caller.key), 502, "upstream_error")
        assert gateway.stats()["attempts"] == 1


PROVIDER = """
import json, sys, uvicorn
attempts = 0
async def app(scope, receive, send):
    global attempts
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stats":
        status, payload = 200, {"attempts": attempts}
    else:
        attempts += 1
        if json.loads(body)["model"] == "quota":
            status, payload = 429, {"error": {"message": "You exceeded your quota: http://10.9.8.7/billing",
                                              "type": "insufficient_quota", "param": None,
                                              "code": "insufficient_quota"}}
        else:
            status, payload = 400, {"error": {"message": "Rejected by http://10.9.8.7/internal for org-secret",
                                              "type": "invalid_request_error", "param": None, "code": None}}
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": data})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


@pytest.mark.parametrize("model, status, code", [("quota", 503, "upstream_quota"), ("bad", 400, "upstream_rejected")])
def test_non_retryable_errors_are_not_retried(make_user, model, status, code):
    caller = make_user()
    with start_server([sys.executable, "-c", PROVIDER, "{port}"]) as provider, gateway_server(
            **FAST, OPENAI_BASE_URL=provider.base_url + "/v1", OPENAI_API_KEY=UPSTREAM_KEY,
            SLUICE_MODELS="quota,bad") as gateway:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        response = httpx2.post(gateway.api_url + "/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {caller.key}"})
        error_of(response, status, code)
        assert_clean(response.text, "10.9.8.7", "org-secret", str(provider.port))
        assert httpx2.get(provider.base_url + "/stats").json()["attempts"] == 1


def test_a_slow_first_token_is_retried_then_answered_504(make_user):
    caller = make_user()
    with gateway_server(**{**FAST, "UPSTREAM_FIRST_TOKEN_TIMEOUT": 0.3, "UPSTREAM_RETRY_DEADLINE": 1}) as gateway:
        gateway.control(ttft_seconds=5)
        response = chat(gateway, caller.key, stream=True)
        error = error_of(response, 504, "upstream_timeout")
        assert "first token" in error["message"]
        # Each attempt was aborted: the simulator saw the gateway close every connection.
        records = eventually(lambda: (r := gateway.stats()["requests"]) and all(x["disconnected"] for x in r) and r)
        assert len(records) >= 2 and gateway.stats()["attempts"] == len(records)
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.reason, row.completion_tokens) == ("upstream_error", "upstream_timeout", 0)


def test_only_the_first_token_is_timed(make_user):
    """Chunks that come slower in total than the first-token timeout are not cut: only silence is (idle timeout)."""
    caller = make_user()
    with gateway_server(**{**FAST, "UPSTREAM_FIRST_TOKEN_TIMEOUT": 2, "UPSTREAM_RETRY_DEADLINE": 0}) as gateway:
        gateway.control(tokens_per_second=2)  # the first token after 0.5 s, the sixth after 3 s
        response = chat(gateway, caller.key, stream=True, max_tokens=6)
        assert response.status_code == 200 and contents(response) == (
            [" the", " quick", " brown", " fox", " jumps", " over"], True)
        assert gateway.stats()["attempts"] == 1


# After the first byte --------------------------------------------------------------------------------------


def test_a_failure_after_the_first_byte_is_not_retried_and_charged_for_what_was_delivered(sim, make_user):
    caller = make_user()
    sim.control(fail_midstream_after=5)
    before = sim.stats()["attempts"]
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    stream = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, max_tokens=20)
    tokens = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            tokens += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(tokens) == 5 and raised.value.code == "upstream_error"
    assert_clean(raised.value.message)
    assert sim.stats()["attempts"] == before + 1
    row = settled_row(stream.response.headers["x-request-id"])
    assert (row.status, row.completion_tokens) == ("upstream_error", 5)


def test_a_provider_silent_mid_answer_is_cut_after_the_idle_timeout(make_user):
    caller = make_user()
    with gateway_server(**{**FAST, "UPSTREAM_IDLE_TIMEOUT": 1, "UPSTREAM_RETRY_DEADLINE": 0}) as gateway:
        gateway.control(stall_midstream_after=3)  # three tokens, then silence on an open connection
        client = openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0)
        # From before the request: the gateway's silence clock starts at the provider's last token, which may reach the
        # gateway before create() returns here (with the response's first bytes): a clock started after create() runs
        # short by that delivery (0.997 s in a CI rehearsal under load).
        started, tokens = time.monotonic(), []
        stream = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=20)
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                tokens += [c.delta.content for c in chunk.choices if c.delta.content]
        assert len(tokens) == 3 and raised.value.code == "upstream_timeout"
        assert 1 <= time.monotonic() - started < 5
        request_id = stream.response.headers["x-request-id"]
        row = settled_row(request_id)
        assert (row.status, row.reason, row.completion_tokens) == ("upstream_error", "upstream_timeout", 3)
        # The provider's request was closed, not left hanging.
        assert eventually(lambda: gateway.sim_request(request_id)["disconnected"])


def test_a_client_that_leaves_during_the_first_token_wait_stops_the_upstream(sim, make_user):
    """The gateway answers once the first token is in, so the client leaves before any response byte."""
    caller = make_user()
    sim.control(ttft_seconds=30)
    sock = send_and_hold(sim, caller.key)
    record = eventually(lambda: (r := sim.stats()["requests"]) and r[-1], timeout=5)
    sock.close()
    closed_at = time.monotonic()
    eventually(lambda: sim.sim_request(record["client_request_id"])["disconnected"], timeout=2)
    assert time.monotonic() - closed_at < 2
    row = settled_row(record["client_request_id"])
    assert (row.status, row.completion_tokens) == ("client_disconnected", 0)


# The circuit breaker ---------------------------------------------------------------------------------------


def test_a_run_of_500s_opens_the_breaker_then_a_probe_closes_it(make_user):
    # One user: the breaker that opens is the user's own (the shared one needs two users' failures: test_fairness.py),
    # which after its cooldown reopens on one failure and closes on a success, as the shared breaker's probe does.
    caller = make_user(**BUSY_USER)
    breaker = {**FAST, "UPSTREAM_BREAKER_THRESHOLD": 3, "UPSTREAM_BREAKER_COOLDOWN": 3}
    with gateway_server(**breaker) as gateway:
        gateway.control(fail_500_rate=1.0)
        # Three failures in a row (one request's retries) open it; the request ends at once.
        first = chat(gateway, caller.key)
        error = error_of(first, 503, "upstream_unavailable")
        assert "paused" in error["message"] and int(first.headers["Retry-After"]) >= 1
        assert gateway.stats()["attempts"] == 3
        # While open: refused without asking the provider.
        error_of(chat(gateway, caller.key, stream=True), 503, "upstream_unavailable")
        assert gateway.stats()["attempts"] == 3

        # After the cooldown one probe goes through; it fails, which reopens the breaker.
        def probed():
            assert chat(gateway, caller.key).status_code == 503
            return gateway.stats()["attempts"] > 3

        eventually(probed, timeout=10, interval=0.1)
        assert gateway.stats()["attempts"] == 4
        error_of(chat(gateway, caller.key), 503, "upstream_unavailable")
        assert gateway.stats()["attempts"] == 4

        # The provider recovers: the next probe succeeds and closes it.
        gateway.control(fail_500_rate=0.0)
        eventually(lambda: chat(gateway, caller.key).status_code == 200, timeout=10, interval=0.1)
        for stream in (True, False, True):
            assert chat(gateway, caller.key, stream=stream).status_code == 200
        assert gateway.stats()["attempts"] == 4 + 4


# The shared limit and its fair queue -----------------------------------------------------------------------


def test_one_users_queue_does_not_starve_another(make_user):
    greedy, modest = make_user(**BUSY_USER), make_user()
    one_at_a_time = {**FAST, "UPSTREAM_CONCURRENCY_MAX": 1, "UPSTREAM_CONCURRENCY_MIN": 1,
                     "UPSTREAM_QUEUE_TIMEOUT": 60, "LOG_LEVEL": "DEBUG"}
    with gateway_server(**one_at_a_time) as gateway, ThreadPoolExecutor(60) as pool:
        # The greedy user's first request takes the one permit and waits for its first token.
        gateway.control(ttft_seconds=60)
        holder = send_and_hold(gateway, greedy.key)
        eventually(lambda: gateway.stats()["in_flight"] == 1)
        gateway.control(ttft_seconds=0)
        greedy_calls = [pool.submit(chat, gateway, greedy.key, True) for _ in range(49)]
        eventually(lambda: queued(gateway) == 49, timeout=30)
        modest_call = pool.submit(chat, gateway, modest.key, True)
        eventually(lambda: queued(gateway) == 50)
        holder.close()  # the permit is free: from now on the queue decides who goes next
        modest_response = modest_call.result(timeout=60)
        greedy_responses = [call.result(timeout=60) for call in greedy_calls]
        order = [record["client_request_id"] for record in gateway.stats()["requests"]]
    assert modest_response.status_code == 200 and all(r.status_code == 200 for r in greedy_responses)
    assert len(order) == 51
    # Admission order is the order the upstream saw requests (one permit: one at a time). First-come-first-served
    # would put the modest request 50th; in turns it comes after the held request and one more greedy one.
    assert order.index(modest_response.headers["x-request-id"]) == 2


def test_a_full_queue_answers_429_upstream_saturated_with_retry_after(make_user):
    caller = make_user(**BUSY_USER)
    settings = {**FAST, "UPSTREAM_CONCURRENCY_MAX": 1, "UPSTREAM_CONCURRENCY_MIN": 1, "UPSTREAM_QUEUE_TIMEOUT": 0.3}
    with gateway_server(**settings) as gateway:
        gateway.control(ttft_seconds=60)
        holder = send_and_hold(gateway, caller.key)
        eventually(lambda: gateway.stats()["in_flight"] == 1)
        response = chat(gateway, caller.key, stream=True)
        error = error_of(response, 429, "upstream_saturated")
        assert "saturated" in error["message"] and int(response.headers["Retry-After"]) >= 1
        assert gateway.stats()["attempts"] == 1
        holder.close()
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.reason) == ("upstream_error", "upstream_saturated")


@pytest.mark.redis
def test_several_processes_share_one_limit(make_user, redis_url):
    caller = make_user(**BUSY_USER)
    simulator = [sys.executable, "-m", "streaming.simulator", "--port", "{port}"]
    with start_server(simulator) as provider, httpx2.Client(base_url=provider.base_url) as provider_http:
        # The provider takes two requests at a time and answers 429 to a third.
        provider_http.post("/control", json={"max_concurrent": 2, "tokens_per_second": 50}).raise_for_status()
        shared = {**FAST, "REDIS_URL": redis_url, "OPENAI_BASE_URL": provider.base_url + "/v1",
                  "OPENAI_API_KEY": UPSTREAM_KEY, "UPSTREAM_CONCURRENCY_MAX": 2, "UPSTREAM_QUEUE_TIMEOUT": 30}
        with gateway_server(**shared) as one, gateway_server(**shared) as two, ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(chat, gateway, caller.key, True, 5) for gateway in (one, two) * 8]
            responses = [call.result(timeout=60) for call in calls]
        stats = provider_http.get("/stats").json()
    assert all(r.status_code == 200 and contents(r)[1] for r in responses)
    # Sixteen requests from two processes, never more than two at once at the provider: no 429, no retry.
    assert (stats["attempts"], stats["rejected_429"]) == (16, 0)


# Units: the fair queue with the in-process store, the first-token detector ---------------------------------


@pytest.fixture
def one_permit():
    with override_settings(SLUICE_COUNTER_STORE="quotas.store.memory.MemoryStore", UPSTREAM_CONCURRENCY_MAX=1,
                           UPSTREAM_CONCURRENCY_MIN=1, UPSTREAM_BREAKER_THRESHOLD=1,
                           UPSTREAM_BREAKER_COOLDOWN=30, UPSTREAM_QUEUE_POLL_INTERVAL=5):
        reset_stores()
        yield
    reset_stores()


async def until(condition):
    while not condition():
        await asyncio.sleep(0)  # let the other tasks run up to their next wait


async def test_the_queue_serves_users_in_turn(one_permit):
    upstream = Upstream("http://unit.test/v1")
    first = await upstream.acquire("greedy", "g0", 5)
    admitted = []

    async def request(user, holder):
        permit = await upstream.acquire(user, holder, 5)
        admitted.append(holder)
        await permit.release(OUTCOME_OK)

    tasks = [asyncio.create_task(request("greedy", f"g{i}")) for i in range(1, 5)]
    await until(lambda: upstream.queue.length == 4)
    tasks += [asyncio.create_task(request("modest", "m1")), asyncio.create_task(request("other", "o1"))]
    await until(lambda: upstream.queue.length == 6)
    tasks.append(asyncio.create_task(request("modest", "m2")))
    await until(lambda: upstream.queue.length == 7)
    await first.release(OUTCOME_OK)
    await asyncio.gather(*tasks)
    assert admitted == ["g1", "m1", "o1", "g2", "m2", "g3", "g4"]


async def test_a_retry_waits_at_the_head_of_its_users_line(one_permit):
    upstream = Upstream("http://unit.test/v1")
    first = await upstream.acquire("a", "a0", 5)
    admitted = []

    async def request(holder, retry=False):
        permit = await upstream.acquire("a", holder, 5, retry=retry)
        admitted.append(holder)
        await permit.release(OUTCOME_OK)

    tasks = [asyncio.create_task(request(f"a{i}")) for i in (1, 2)]
    await until(lambda: upstream.queue.length == 2)
    tasks.append(asyncio.create_task(request("a3-retry", retry=True)))
    await until(lambda: upstream.queue.length == 3)
    await first.release(OUTCOME_OK)
    await asyncio.gather(*tasks)
    assert admitted == ["a3-retry", "a1", "a2"]


async def test_a_request_that_gives_up_leaves_the_queue(one_permit):
    upstream = Upstream("http://unit.test/v1")
    first = await upstream.acquire("a", "a0", 5)
    with pytest.raises(Exception) as refused:
        await upstream.acquire("b", "b0", 0.01)
    assert (refused.value.status, refused.value.code) == (429, "upstream_saturated")
    assert refused.value.retry_after_seconds >= 1
    waiting = asyncio.create_task(upstream.acquire("c", "c0", 5))
    await until(lambda: upstream.queue.length == 1)
    waiting.cancel()
    await until(lambda: upstream.queue.length == 0)
    await first.release(OUTCOME_OK)
    assert (await upstream.acquire("d", "d0", 5)).holder == "d0"


async def test_when_the_breaker_opens_everyone_waiting_hears_it(one_permit):
    upstream = Upstream("http://unit.test/v1")
    first = await upstream.acquire("a", "a0", 5)
    waiting = [asyncio.create_task(upstream.acquire(user, f"{user}1", 5)) for user in "bcd"]
    await until(lambda: upstream.queue.length == 3)
    await first.release(OUTCOME_FAILED)  # the threshold is 1
    for task in waiting:
        with pytest.raises(Exception) as refused:
            await task
        assert (refused.value.status, refused.value.code) == (503, "upstream_unavailable")


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_store_that_is_down_fails_open_or_closed_as_set(fail_open):
    from bench.servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with override_settings(SLUICE_COUNTER_STORE="quotas.store.redis.RedisStore", REDIS_URL=url,
                           CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}},
                           UPSTREAM_LIMIT_FAIL_OPEN=fail_open):
        reset_stores()
        upstream = Upstream("http://unit.test/v1")
        try:
            if fail_open:
                permit = await upstream.acquire("a", "a0", 1)
                assert not permit.guarded
                await permit.release(OUTCOME_OK)  # nothing to give back, no error
            else:
                with pytest.raises(Exception) as refused:
                    await upstream.acquire("a", "a0", 1)
                assert (refused.value.status, refused.value.code) == (503, "service_unavailable")
        finally:
            reset_stores()
