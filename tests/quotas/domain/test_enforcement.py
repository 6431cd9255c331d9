"""Quotas enforced by real gateway processes, on the real stores (in-process and Redis)."""

import asyncio
import os
import signal

import httpx2
import openai
import pytest
import redis

from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "count"}]


@pytest.fixture(params=["memory", "redis"])
def store_gateway(request, sim):
    """The session gateway (in-process store), or a gateway on Redis."""
    if request.param == "memory":
        yield sim
        return
    with gateway_server(REDIS_URL=request.getfixturevalue("redis_url")) as gateway:
        yield gateway


async def consume(client, max_tokens):
    """Stream one completion; return (content chunks received, how it ended)."""
    received = 0
    try:
        stream = await client.chat.completions.create(model="sim-small", messages=MESSAGES, stream=True,
                                                      max_tokens=max_tokens)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
        return received, "completed"
    except openai.RateLimitError as error:
        return received, error.code
    except openai.APIError as error:
        return received, error.code


def test_fifty_concurrent_streams_never_exceed_the_quota(store_gateway, make_user):
    from django.db.models import Sum

    from quotas.models import Usage

    quota = 2000
    caller = make_user(tokens_per_day=quota, concurrent_streams=50, requests_per_minute=1000)
    store_gateway.control(tokens_per_second=200, default_tokens=200)

    async def run():
        client = openai.AsyncOpenAI(base_url=store_gateway.api_url, api_key=caller.key, max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(consume(client, 150) for _ in range(50)))  # 50 x 150 > 2000
        finally:
            await client.close()

    results = asyncio.run(run())
    endings = [ending for _, ending in results]
    assert "insufficient_quota" in endings  # some were cut or refused
    delivered = sum(received for received, _ in results)
    rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user)).exclude(status="streaming").count() == 50
                      and q, timeout=10)
    totals = rows.aggregate(p=Sum("prompt_tokens"), c=Sum("completion_tokens"))
    # The ledger charges exactly what was delivered, and everything charged fits in the quota.
    assert totals["c"] == delivered
    assert totals["p"] + totals["c"] <= quota
    assert totals["p"] + totals["c"] > quota - 200  # and the quota was used, not refused wholesale
    assert set(rows.values_list("status", flat=True)) <= {"completed", "quota_exhausted", "rejected"}


def test_two_processes_share_one_limit(redis_url, make_user):
    caller = make_user(tokens_per_day=400, requests_per_minute=10, max_tokens_per_request=50)
    with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
        statuses = []
        for i in range(14):
            gateway = (first, second)[i % 2]
            response = httpx2.post(gateway.api_url + "/chat/completions", timeout=30,
                                   headers={"Authorization": f"Bearer {caller.key}"},
                                   json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 20})
            statuses.append((response.status_code, response.json().get("error", {}).get("code")))
        # 10 requests a minute in all, not 10 per process.
        assert statuses.count((200, None)) == 10
        assert set(statuses[10:]) == {(429, "rate_limit_exceeded")}
        quota = httpx2.get(second.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"}).json()
        # 20 completion + 8 prompt tokens each (3 to prime the reply, 3 for the message, "user" 1, "count" 1).
        assert quota["tokens"]["day"]["used"] == 10 * (20 + 8)
        assert quota["requests"]["remaining"] == 0


def test_tokens_are_shared_by_two_processes(redis_url, make_user):
    caller = make_user(tokens_per_day=300, requests_per_minute=1000)
    with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
        charged = 0
        for i in range(30):
            gateway = (first, second)[i % 2]
            response = httpx2.post(gateway.api_url + "/chat/completions", timeout=30,
                                   headers={"Authorization": f"Bearer {caller.key}"},
                                   json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 40})
            if response.status_code != 200:
                assert response.json()["error"]["code"] == "insufficient_quota"
                assert int(response.headers["retry-after"]) > 0
                break
            charged += response.json()["usage"]["total_tokens"]
        assert 250 < charged <= 300


def test_slots_are_released_on_disconnect(sim, make_user):
    from tests.support.gateways import open_stream

    caller = make_user(concurrent_streams=1)
    sim.control(tokens_per_second=20, default_tokens=1000)
    sock, request_id, _ = open_stream(sim, caller.key)
    refused = httpx2.post(sim.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                          json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 1})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert refused.headers["retry-after"]
    sock.close()
    settled_row(request_id)
    admitted = httpx2.post(sim.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                           json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 1})
    assert admitted.status_code == 200


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_concurrency_refusal_does_not_spend_the_request_rate(request, store, make_user):
    # Issue 15, finding 8: an SDK retrying concurrency refusals (as Retry-After says) turned them into rate refusals,
    # each refused attempt having counted against the per-minute limit. A request refused at admission (concurrency,
    # tokens, model) reaches no provider and is given back.
    from tests.support.gateways import open_stream

    env = {"REDIS_URL": request.getfixturevalue("redis_url")} if store == "redis" else {}
    caller = make_user(concurrent_streams=1, requests_per_minute=4)
    headers = {"Authorization": f"Bearer {caller.key}"}
    body = {"model": "sim-small", "messages": MESSAGES, "max_tokens": 1}
    with gateway_server(**env) as gateway:
        gateway.control(tokens_per_second=20, default_tokens=1000)
        sock, request_id, _ = open_stream(gateway, caller.key)  # spends 1 of the 4
        refusals = [httpx2.post(gateway.api_url + "/chat/completions", headers=headers, json=body) for _ in range(8)]
        assert [r.json()["error"]["code"] for r in refusals] == ["concurrency_limit_exceeded"] * 8
        assert {r.headers["x-ratelimit-remaining-requests"] for r in refusals} == {"3"}
        sock.close()
        settled_row(request_id)
        admitted = [httpx2.post(gateway.api_url + "/chat/completions", headers=headers, json=body) for _ in range(3)]
        assert [r.status_code for r in admitted] == [200] * 3
        refused = httpx2.post(gateway.api_url + "/chat/completions", headers=headers, json=body)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_killed_workers_slot_frees_within_the_ttl(redis_url, make_user):
    from tests.support.gateways import open_stream

    caller = make_user(concurrent_streams=1)
    headers = {"Authorization": f"Bearer {caller.key}"}
    body = {"model": "sim-small", "messages": MESSAGES, "max_tokens": 1}
    with gateway_server(REDIS_URL=redis_url, QUOTA_SLOT_TTL=2) as survivor:
        with gateway_server(REDIS_URL=redis_url, QUOTA_SLOT_TTL=2) as doomed:
            doomed.control(tokens_per_second=5, default_tokens=1000)
            sock, _, _ = open_stream(doomed, caller.key)
            assert httpx2.post(survivor.api_url + "/chat/completions", headers=headers, json=body).status_code == 429
            os.kill(doomed.server.process.pid, signal.SIGKILL)
            doomed.server.process.wait()
            sock.close()
        # Nobody releases the dead worker's slot; its TTL does.
        eventually(lambda: httpx2.post(survivor.api_url + "/chat/completions", headers=headers,
                                       json=body).status_code == 200, timeout=5, interval=0.25)


def test_flushing_redis_mid_window_keeps_every_quota(redis_url, make_user):
    caller = make_user(tokens_per_day=300, requests_per_minute=1000)
    headers = {"Authorization": f"Bearer {caller.key}"}
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)
        for _ in range(5):
            response = httpx2.post(gateway.api_url + "/chat/completions", headers=headers, timeout=30,
                                   json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 40})
            assert response.status_code == 200
        used = httpx2.get(gateway.api_url + "/quota", headers=headers).json()["tokens"]["day"]["used"]
        assert used == 5 * (40 + 8)
        redis.Redis.from_url(redis_url).flushdb()
        # Rebuilt from the ledger, not reset.
        quota = httpx2.get(gateway.api_url + "/quota", headers=headers).json()
        assert quota["tokens"]["day"]["used"] == used and quota["tokens"]["month"]["used"] == used
        response = httpx2.post(gateway.api_url + "/chat/completions", headers=headers, timeout=30,
                               json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 200})
        # What was left (less the prompt's 8 tokens), no more.
        assert 300 - used - 10 <= response.json()["usage"]["completion_tokens"] <= 300 - used - 4
        final = httpx2.get(gateway.api_url + "/quota", headers=headers).json()["tokens"]["day"]["used"]
        assert used < final <= 300


def test_each_ending_writes_one_row_with_its_status(sim, make_user):
    from quotas.models import Usage

    caller = make_user(tokens_per_day=10_000, requests_per_minute=6)
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    ids = {}
    response = client.chat.completions.with_raw_response.create(model="sim-small", messages=MESSAGES, stream=True,
                                                                max_tokens=5)
    list(response.parse())
    ids["completed"] = response.headers["x-request-id"]

    sim.control(fail_midstream_after=3)
    response = client.chat.completions.with_raw_response.create(model="sim-small", messages=MESSAGES, stream=True,
                                                                max_tokens=10)
    with pytest.raises(openai.APIError) as error:
        list(response.parse())
    assert error.value.code == "upstream_error"
    ids["upstream_error"] = response.headers["x-request-id"]
    sim.control(fail_midstream_after=0)

    for status, request_id in ids.items():
        row = settled_row(request_id)
        assert row.status == status
    assert settled_row(ids["upstream_error"]).completion_tokens == 3
    # Over the request rate: refused, and the refusal has its row too.
    while True:
        try:
            client.models.list()
            client.chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=1)
        except openai.RateLimitError as refused:
            assert refused.code == "rate_limit_exceeded"
            ids["rejected"] = refused.response.headers["x-request-id"] if "x-request-id" in refused.response.headers \
                else None
            break
    assert Usage.objects.filter(user=caller.user, status="rejected", reason="rate_limit_exceeded").count() == 1
    for request_id in filter(None, ids.values()):
        assert Usage.objects.filter(request_id=request_id).count() == 1
    # Each settlement also rolled its row up into the day's totals (one upsert per settlement).
    from django.db.models import Count, Q, Sum

    from quotas.models import DailyUsage

    rows = Usage.objects.filter(user=caller.user).exclude(status="streaming")
    expected = rows.aggregate(requests=Count("id"), prompt_tokens=Sum("prompt_tokens"),
                              completion_tokens=Sum("completion_tokens"),
                              refusals=Count("id", filter=Q(status="rejected")),
                              upstream_errors=Count("id", filter=Q(status="upstream_error")))
    assert expected["requests"] == 7 and expected["refusals"] == 1 and expected["upstream_errors"] == 1
    rollup = DailyUsage.objects.filter(user=caller.user).aggregate(**{name: Sum(name) for name in expected})
    assert rollup == expected


def test_a_running_stream_has_its_ledger_row_within_a_second(sim, make_user):
    from quotas.models import Usage

    caller = make_user()
    sim.control(tokens_per_second=10)
    body = {"model": "sim-small", "messages": MESSAGES, "stream": True, "max_tokens": 60}
    with httpx2.stream("POST", sim.api_url + "/chat/completions", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {caller.key}"}) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content"' in line)
        # Written off the first token's path, while the stream runs: its reservation is in the ledger.
        row = eventually(lambda: Usage.objects.filter(request_id=response.headers["x-request-id"]).first(),
                         timeout=3)
        assert row.status == "streaming" and row.reserved_tokens > 0
    settled = settled_row(row.request_id)
    assert settled.pk == row.pk and settled.status == "client_disconnected"


def test_quota_exhausted_mid_stream_ends_with_an_sdk_error(sim, make_user):
    caller = make_user(tokens_per_day=50)
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    response = client.chat.completions.with_raw_response.create(model="sim-small", messages=MESSAGES, stream=True,
                                                                max_tokens=200)
    # max_tokens was clamped to what remains, so the stream completes within the quota.
    received = sum(1 for c in response.parse() if c.choices and c.choices[0].delta.content)
    row = settled_row(response.headers["x-request-id"])
    assert row.prompt_tokens + row.completion_tokens <= 50 and received == row.completion_tokens
    assert int(response.headers["x-ratelimit-remaining-tokens"]) <= 50
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="sim-small", messages=MESSAGES, stream=True)
    assert refused.value.code == "insufficient_quota"
    assert "resets at" in refused.value.message


def test_rate_limit_headers_on_every_v1_response(sim, make_user):
    caller = make_user(requests_per_minute=7, tokens_per_day=1234)
    headers = {"Authorization": f"Bearer {caller.key}"}
    stream = httpx2.post(sim.api_url + "/chat/completions", headers=headers,
                         json={"model": "sim-small", "messages": MESSAGES, "stream": True, "max_tokens": 3})
    for response in (stream, httpx2.get(sim.api_url + "/models", headers=headers),
                     httpx2.get(sim.api_url + "/quota", headers=headers)):
        assert response.headers["x-ratelimit-limit-requests"] == "7"
        assert response.headers["x-ratelimit-remaining-requests"] == "6"
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert response.headers["x-ratelimit-limit-tokens"] == "1234"
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 1234
        assert response.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_quota_endpoint(sim, make_user):
    caller = make_user(tokens_per_day=1000, tokens_per_month=5000, allowed_models=["sim-large"])
    quota = httpx2.get(sim.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"}).json()
    assert quota["tokens"]["day"]["limit"] == 1000 and quota["tokens"]["month"]["limit"] == 5000
    assert quota["tokens"]["day"]["remaining"] == 1000 and quota["models"] == ["sim-large"]
    assert quota["tokens"]["day"]["resets_at"] and quota["tokens"]["month"]["reset_seconds"] > 0


def test_suspended_users_are_refused(sim, make_user):
    from quotas.models import UserQuota

    caller = make_user()
    UserQuota.objects.filter(user=caller.user).update(suspended=True)
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="sim-small", messages=MESSAGES)
    assert refused.value.code == "account_suspended"


def test_token_quota_fails_closed_when_the_store_is_down(make_user):
    caller = make_user()
    with gateway_server(REDIS_URL="redis://127.0.0.1:1/0") as gateway:
        response = httpx2.post(gateway.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                               json={"model": "sim-small", "messages": MESSAGES}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable" and response.headers["retry-after"]
    with gateway_server(REDIS_URL="redis://127.0.0.1:1/0", QUOTA_RATE_FAIL_OPEN="1",
                        QUOTA_CONCURRENCY_FAIL_OPEN="1") as gateway:
        response = httpx2.post(gateway.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                               json={"model": "sim-small", "messages": MESSAGES}, timeout=30)
        # The request rate and concurrency fail open, as configured; tokens never do.
        assert response.status_code == 503 and "quota" in response.json()["error"]["message"]
