"""Every ending settled, never over a window (issue 14): a completion's accounting against providers that are not
Sluice's simulator (tests/support/dialects.py), a counter store that is flushed or killed, and a killed gateway.

Real processes throughout: gateways (tests/support/gateways.py), the dialect provider under Uvicorn, Redis, and the
official openai SDK as the client.
"""

import asyncio
import os
import signal
import subprocess

import httpx2
import openai
import pytest
from django.db.models import Sum

from bench.servers import free_port
from quotas.models import Usage
from tests.support.dialects import HIDDEN_REASONING_TOKENS
from tests.support.gateways import eventually, gateway_server, open_stream, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

DIALECTS = "no-done,truncated,no-usage,over-reported,ignores-max-tokens,reasoning"
MESSAGES = [{"role": "user", "content": "count"}]


@pytest.fixture(scope="module")
def gateway(dialects, django_db_setup, django_db_blocker):
    """A gateway whose provider is the dialect server (the model name picks the dialect)."""
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS=DIALECTS) as running:
        yield running


def stream(gateway, key, model, max_tokens=20, include_usage=False):
    """(content chunks received, finish reasons, usage chunk or None, the request id) through the sync SDK."""
    client = openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0, timeout=30)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, stream=True, max_tokens=max_tokens, **options)
    received, finishes, usage = 0, [], None
    for chunk in response.parse():
        for choice in chunk.choices:
            if choice.delta.content:
                received += 1
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    return received, finishes, usage, response.headers["x-request-id"]


def test_a_stream_ending_without_done_completes_for_the_client_and_the_ledger(gateway, make_user):
    caller = make_user()
    received, finishes, usage, request_id = stream(gateway, caller.key, "no-done", include_usage=True)
    assert (received, finishes) == (20, ["stop"])  # no APIConnectionError: the client got its end
    assert usage.completion_tokens == 20
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens, row.usage_reported) == ("completed", 20, True)
    assert Usage.objects.filter(request_id=request_id).count() == 1


def test_a_stream_cut_without_a_finish_reason_ends_with_an_error_and_is_charged_what_was_sent(gateway, make_user):
    caller = make_user()
    client = openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)
    received = 0
    with pytest.raises(openai.APIError) as failed:
        for chunk in client.chat.completions.create(model="truncated", messages=MESSAGES, stream=True,
                                                    max_tokens=20):
            received += sum(1 for c in chunk.choices if c.delta.content)
    assert failed.value.code == "upstream_error" and received == 10
    row = Usage.objects.get(user=caller.user)
    row = settled_row(row.request_id)
    assert (row.status, row.completion_tokens, row.usage_reported) == ("upstream_error", 10, False)
    assert row.charged_tokens == row.prompt_tokens + 10


def test_a_client_that_asked_for_usage_gets_sluices_count_when_the_provider_sends_none(gateway, make_user):
    caller = make_user()
    received, finishes, usage, request_id = stream(gateway, caller.key, "no-usage", include_usage=True)
    assert (received, finishes) == (20, ["stop"])
    assert usage is not None and usage.completion_tokens == 20
    assert usage.total_tokens == usage.prompt_tokens + 20 and usage.prompt_tokens > 0
    row = settled_row(request_id)
    # The ledger says whose count it is.
    assert (row.status, row.completion_tokens, row.usage_reported) == ("completed", 20, False)


def test_the_gateway_enforces_max_tokens_when_the_provider_ignores_it(gateway, make_user):
    caller = make_user()
    received, finishes, usage, request_id = stream(gateway, caller.key, "ignores-max-tokens", max_tokens=10,
                                                   include_usage=True)
    assert (received, finishes) == (10, ["length"])
    assert usage.completion_tokens == 10
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens) == ("completed", 10)


def test_reported_usage_beyond_what_was_streamed_never_takes_a_window_past_its_limit(gateway, make_user):
    limit = 2000
    caller = make_user(tokens_per_day=limit, concurrent_streams=16, requests_per_minute=1000)

    async def one(client):
        try:
            response = await client.chat.completions.create(model="over-reported", messages=MESSAGES, stream=True,
                                                            max_tokens=40)
            async for _ in response:
                pass
        except openai.APIError:
            pass

    async def run():
        client = openai.AsyncOpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)
        try:
            await asyncio.gather(*(one(client) for _ in range(16)))
        finally:
            await client.close()

    asyncio.run(run())
    rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user)).filter(status="streaming").count() == 0
                      and q, timeout=10)
    completed = rows.filter(status="completed")
    assert completed.exists()
    totals = rows.aggregate(charged=Sum("charged_tokens"), reported=Sum("completion_tokens"))
    # The provider's truth is in the ledger (its hidden reasoning included) ... A stream admitted once others had
    # topped the window up nearly to its limit had its max_tokens clamped to what was left (fewer than 40 streamed):
    # which streams those are depends on timing (a CI run saw one), so each row is held to its own stream.
    assert all(row.usage_reported and row.reasoning_tokens == HIDDEN_REASONING_TOKENS
               and HIDDEN_REASONING_TOKENS < row.completion_tokens <= 40 + HIDDEN_REASONING_TOKENS
               for row in completed), [(row.completion_tokens, row.reasoning_tokens) for row in completed]
    # ... but what the windows were charged never passes the limit, and the counters agree with the ledger.
    assert totals["charged"] <= limit < totals["reported"]
    quota = httpx2.get(gateway.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"}).json()
    assert quota["tokens"]["day"]["used"] == totals["charged"]


@pytest.fixture
def private_redis():
    """A redis-server of this test's own (it will be flushed and killed), on a free port."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    eventually(lambda: _pings(client), timeout=5)
    yield url, client, process
    client.close()
    process.kill()
    process.wait()


def _pings(client):
    import redis

    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_requests_in_flight_across_a_store_flush_still_count(private_redis, make_user):
    url, client, _ = private_redis
    limit = 1000
    caller = make_user(tokens_per_day=limit, concurrent_streams=20, requests_per_minute=1000)
    body = {"model": "sim-small", "messages": MESSAGES, "max_tokens": 100}
    headers = {"Authorization": f"Bearer {caller.key}"}
    with gateway_server(REDIS_URL=url) as gateway:
        gateway.control(ttft_seconds=2.0)

        async def send(n):
            async with httpx2.AsyncClient(timeout=30) as http:
                return await asyncio.gather(*(http.post(gateway.api_url + "/chat/completions", json=body,
                                                        headers=headers) for _ in range(n)))

        async def run():
            first = asyncio.ensure_future(send(8))
            # Eight requests admitted and waiting for their provider (each holds a reservation of ~107 tokens) ...
            await asyncio.to_thread(eventually, lambda: len([r for r in gateway.stats()["requests"]
                                                             if not r["finished"]]) == 8, 10)
            client.flushall()  # ... when the counter store loses everything.
            second = await send(8)
            return await first, second

        first, second = asyncio.run(run())
    assert all(r.status_code == 200 for r in first)
    admitted_after = [r for r in second if r.status_code == 200]
    assert len(admitted_after) <= 2  # the rebuilt windows still hold the eight reservations
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in second if r.status_code != 200)
    rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user)).filter(status="streaming").count() == 0
                      and q, timeout=10)
    assert rows.aggregate(charged=Sum("charged_tokens"))["charged"] <= limit


def test_a_stream_cut_by_a_store_outage_says_so_in_the_ledger(private_redis, make_user):
    url, _, process = private_redis
    caller = make_user()
    with gateway_server(REDIS_URL=url) as gateway:
        gateway.control(tokens_per_second=20, default_tokens=1000)
        sock, request_id, head = open_stream(gateway, caller.key)
        received = head
        while received.count(b'"content":" ') < 3:
            received += sock.recv(65536)
        process.kill()  # the next lease (at 32 tokens) finds no store
        process.wait()
        while b'"error"' not in received:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended without an error event"
            received += chunk
        sock.close()
        assert b'"code": "service_unavailable"' in received
        row = settled_row(request_id)
    assert (row.status, row.reason) == ("store_unavailable", "service_unavailable")
    assert 0 < row.completion_tokens <= 32


def test_a_killed_workers_stream_is_settled_by_another_process(private_redis, make_user):
    url, _, _ = private_redis
    caller = make_user()
    headers = {"Authorization": f"Bearer {caller.key}"}
    with gateway_server(REDIS_URL=url, QUOTA_SLOT_TTL=2) as survivor:
        with gateway_server(REDIS_URL=url, QUOTA_SLOT_TTL=2) as doomed:
            doomed.control(tokens_per_second=50, default_tokens=1000)
            sock, request_id, head = open_stream(doomed, caller.key)
            received = head
            while received.count(b'"content":" ') < 40:  # past its first lease block (32): progress recorded
                received += sock.recv(65536)
            os.kill(doomed.server.process.pid, signal.SIGKILL)
            doomed.server.process.wait()
            received += sock.recv(1 << 20)
            sock.close()
        delivered = received.count(b'"content":" ')
        # The survivor, serving requests, looks for rows of lost processes.
        assert httpx2.post(survivor.api_url + "/chat/completions", headers=headers, timeout=30,
                           json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 5}).status_code == 200
        row = eventually(lambda: Usage.objects.filter(request_id=request_id, status="worker_lost",
                                                      charged_tokens__gt=0).first(), timeout=10)
        # Charged what it had sent by its last progress record: at most one lease block (at most 512) unbilled.
        assert 32 < row.completion_tokens <= delivered + 64 and delivered - row.completion_tokens <= 512
        assert row.charged_tokens == row.prompt_tokens + row.completion_tokens and row.ended_at
        quota = httpx2.get(survivor.api_url + "/quota", headers=headers).json()
        assert quota["tokens"]["day"]["used"] >= row.charged_tokens


def test_a_request_waiting_longer_than_a_lease_lives_for_its_provider_is_not_taken_for_dead(redis_url, make_user):
    # A slow provider is not a dead process: the request's heartbeat goes on while it waits (non-streaming, or a
    # stream before its first token), so no other process settles it as lost and nothing is charged twice.
    caller = make_user()
    headers = {"Authorization": f"Bearer {caller.key}"}
    with gateway_server(REDIS_URL=redis_url, QUOTA_SLOT_TTL=1) as gateway:
        gateway.control(ttft_seconds=3.0)
        response = httpx2.post(gateway.api_url + "/chat/completions", headers=headers, timeout=30,
                               json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 5})
        assert response.status_code == 200
        row = settled_row(response.headers["x-request-id"])
        assert row.status == "completed" and row.charged_tokens == row.prompt_tokens + row.completion_tokens
        quota = httpx2.get(gateway.api_url + "/quota", headers=headers).json()
        assert quota["tokens"]["day"]["used"] == row.charged_tokens


def test_a_stream_admitted_near_the_limit_asks_the_provider_for_what_is_left(gateway, make_user):
    """What made the test above flaky in CI, in order: three streams top the window up with their hidden reasoning,
    the fourth is admitted with fewer than 40 tokens left and asks the provider for only those; the ledger keeps its
    provider's report (what it streamed + the hidden 500) and no window passes its limit."""
    streams = []

    async def run(limit):
        caller = await asyncio.to_thread(make_user, tokens_per_day=limit, concurrent_streams=4)
        client = openai.AsyncOpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)
        try:
            for _ in range(4):
                response = await client.chat.completions.create(model="over-reported", messages=MESSAGES,
                                                                stream=True, max_tokens=40)
                streams.append(sum([bool(chunk.choices and chunk.choices[0].delta.content)
                                    async for chunk in response]))
        finally:
            await client.close()
        return caller

    full = 40 + HIDDEN_REASONING_TOKENS  # the completion of a stream that got its 40
    caller = asyncio.run(run(3 * (full + 5) + 25))  # 5: the prompt's estimate, charged too
    rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user).order_by("pk")).filter(
        status="streaming").count() == 0 and list(q), timeout=10)
    assert streams[:3] == [40, 40, 40] and 0 < streams[3] < 40, streams
    assert [row.status for row in rows] == ["completed"] * 4
    assert [row.completion_tokens for row in rows] == [full] * 3 + [streams[3] + HIDDEN_REASONING_TOKENS]
    assert sum(row.charged_tokens for row in rows) <= 3 * (full + 5) + 25
