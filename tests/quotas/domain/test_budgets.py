"""Money budgets per user (issue 18, items 2 and 3 per user), enforced by real gateway processes on PostgreSQL and
Redis: the mid-stream ceiling in money, 50 concurrent streams over two processes, a rebuild from the ledger.

Each gateway serves a priced model from its own simulator (as in tests/streaming/catalogue/test_prices.py): 1 per
million input tokens and 4 per million output tokens, 1,000 and 4,000 nanos a token. The prompt ("count") is 8
tokens. Token limits are far away: only the budget binds.
"""

import asyncio
import datetime
from decimal import Decimal

import httpx2
import openai
import pytest
import redis
from django.db.models import Sum
from django.utils import timezone

from quotas.models import Usage
from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "count"}]
INPUT_NANOS, OUTPUT_NANOS = 1000, 4000


@pytest.fixture
def priced_model():
    simulator = Provider.objects.create(name="simulator", base_url="")
    model = ServedModel.objects.create(name="sim-small")
    Deployment.objects.create(model=model, provider=simulator, upstream_model="sim-small")
    ModelPrice.objects.create(model=model, effective_from=timezone.now() - datetime.timedelta(days=1),
                              input=Decimal("1"), output=Decimal("4"))
    return model


async def consume(client, max_tokens, streaming=None):
    """Stream one completion; return (content chunks received, how it ended, the error's message). `streaming`: an
    asyncio.Event set at its first content chunk."""
    received = 0
    try:
        stream = await client.chat.completions.create(model="sim-small", messages=MESSAGES, stream=True,
                                                      max_tokens=max_tokens)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if streaming is not None:
                    streaming.set()
        return received, "completed", ""
    except openai.APIError as error:
        return received, error.code, error.message


def run_streams(gateways, keys, count, max_tokens):
    """`count` streams at once, round-robin over the gateways and `keys` (one key, or several)."""
    keys = [keys] if isinstance(keys, str) else keys

    async def run():
        clients = [openai.AsyncOpenAI(base_url=g.api_url, api_key=key, max_retries=0, timeout=60)
                   for key in keys for g in gateways]
        try:
            return await asyncio.gather(*(consume(clients[i % len(clients)], max_tokens) for i in range(count)))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(run())


def settled_rows(user, count):
    return eventually(lambda: (q := Usage.objects.filter(user=user)).exclude(status="streaming").count() == count
                      and q, timeout=15)


def test_a_stream_is_cut_mid_way_when_the_budget_runs_out(priced_model, redis_url, make_user):
    # Two prompts of 8 tokens and 300 completion tokens fit. The second stream is admitted while the first has leased
    # only its first blocks: each is given max_tokens = 200 (its first block and what every window still had), so
    # together they would need 400 — whichever leases last is cut where the budget runs out.
    budget = 8 * INPUT_NANOS * 2 + 300 * OUTPUT_NANOS
    caller = make_user(tokens_per_day=10**7, tokens_per_month=10**8, concurrent_streams=10, requests_per_minute=100,
                       budget_per_day=Decimal(budget) / 10**9)
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(tokens_per_second=100, default_tokens=500)

        async def run():
            client = openai.AsyncOpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=60)
            try:
                streaming = asyncio.Event()
                first = asyncio.ensure_future(consume(client, 200, streaming))
                await streaming.wait()
                return await asyncio.gather(first, consume(client, 200))
            finally:
                await client.close()

        results = asyncio.run(run())
    cut = [(received, message) for received, ending, message in results if ending == "insufficient_quota"]
    assert len(cut) == 1, results
    # The client's error event names the money window that ran out.
    assert "daily budget (USD)" in cut[0][1], cut
    rows = settled_rows(caller.user, 2)
    assert sorted(rows.values_list("status", flat=True)) == ["completed", "quota_exhausted"]
    row = rows.get(status="quota_exhausted")
    assert row.reason == "insufficient_quota" and 0 < row.completion_tokens < 200
    assert row.charged_nanos == row.cost_nanos > 0
    totals = rows.aggregate(charged=Sum("charged_nanos"), completion=Sum("completion_tokens"))
    assert totals["completion"] == sum(received for received, _, _ in results)
    assert budget - 32 * OUTPUT_NANOS < totals["charged"] <= budget  # the budget was used, never passed


def test_fifty_concurrent_streams_over_two_processes_never_exceed_the_budget(priced_model, redis_url, make_user):
    budget = 8_000_000  # about 2,000 completion tokens; 50 x 150 would be 7,500
    caller = make_user(tokens_per_day=10**7, tokens_per_month=10**8, concurrent_streams=50,
                       requests_per_minute=1000, budget_per_month=Decimal(budget) / 10**9)
    with gateway_server(REDIS_URL=redis_url) as first, gateway_server(REDIS_URL=redis_url) as second:
        for gateway in (first, second):
            gateway.control(tokens_per_second=200, default_tokens=200)
        results = run_streams([first, second], caller.key, 50, 150)
        quota = httpx2.get(first.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"})
        assert quota.status_code == 200
    endings = {ending for _, ending, _ in results}
    assert "insufficient_quota" in endings and endings <= {"completed", "insufficient_quota"}
    messages = {message for _, ending, message in results if ending == "insufficient_quota"}
    assert all("monthly budget (USD)" in message for message in messages), messages
    rows = settled_rows(caller.user, 50)
    totals = rows.aggregate(charged=Sum("charged_nanos"), cost=Sum("cost_nanos"), c=Sum("completion_tokens"))
    assert totals["c"] == sum(received for received, _, _ in results)
    assert totals["charged"] <= budget
    assert totals["charged"] > budget - 200 * OUTPUT_NANOS  # close to it
    assert all(row.charged_nanos <= row.cost_nanos for row in rows.exclude(status="rejected"))
    assert set(rows.values_list("status", flat=True)) <= {"completed", "quota_exhausted", "rejected"}


def test_a_flushed_redis_rebuilds_the_budget_from_the_ledger(priced_model, redis_url, make_user):
    budget = 1_000_000
    caller = make_user(tokens_per_day=10**7, tokens_per_month=10**8, requests_per_minute=1000,
                       budget_per_day=Decimal(budget) / 10**9)
    headers = {"Authorization": f"Bearer {caller.key}"}
    with gateway_server(REDIS_URL=redis_url) as gateway:
        gateway.control(default_tokens=500)

        def ask(max_tokens):
            response = httpx2.post(gateway.api_url + "/chat/completions", headers=headers, timeout=30,
                                   json={"model": "sim-small", "messages": MESSAGES, "max_tokens": max_tokens})
            return response, settled_row(response.headers["x-request-id"])

        for _ in range(5):
            response, row = ask(40)
            assert response.status_code == 200 and row.charged_nanos == 8 * INPUT_NANOS + 40 * OUTPUT_NANOS
        spent = 5 * (8 * INPUT_NANOS + 40 * OUTPUT_NANOS)
        redis.Redis.from_url(redis_url).flushdb()
        # Rebuilt from the ledger's charged_nanos, not reset: what was left (less the prompt), no more.
        response, row = ask(200)
        assert response.status_code == 200
        left = (budget - spent - 8 * INPUT_NANOS) // OUTPUT_NANOS
        assert 0 < row.completion_tokens <= left
        assert row.charged_nanos <= budget - spent
        # Spent: the next request is refused, naming the budget.
        refused, _ = ask(40)
        assert refused.status_code == 429 and "daily budget" in refused.json()["error"]["message"]
    total = Usage.objects.filter(user=caller.user).aggregate(charged=Sum("charged_nanos"))["charged"]
    assert total <= budget
