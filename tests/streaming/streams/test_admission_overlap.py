"""The ledger row's insert off the first token's path (issue 20): the provider is asked while the row goes in, and a
lease that a counter store rebuild lost in the meantime is taken again, or refused, before anything is delivered.

PostgreSQL only: the tests hold the insert back with a table lock that lets the gateway's reads through (SQLite's
writer lock would hold back the whole gateway). Real processes: a gateway, its simulator, Redis.
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
import redis
from django.db import connection, transaction
from django.db.models import Sum

from quotas.models import Usage
from tests.support.gateways import eventually, gateway_server, settled_row, sse_events

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(connection.vendor != "postgresql",
                                 reason="an SQLite writer's lock holds back the gateway's reads too")]

MESSAGES = [{"role": "user", "content": "count"}]


@contextlib.contextmanager
def ledger_inserts_held():
    """Until the block ends, no process can insert a ledger row (reads go on): EXCLUSIVE conflicts only with writes."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {connection.ops.quote_name(Usage._meta.db_table)} IN EXCLUSIVE MODE")
        yield


def provider_requests(gateway):
    return len(gateway.stats()["requests"])


def post(gateway, key, **body):
    return httpx2.post(gateway.api_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "sim-small", "messages": MESSAGES, **body}, timeout=30)


def test_the_provider_is_asked_while_the_ledger_row_goes_in(make_user):
    caller = make_user()
    with gateway_server() as gateway, ThreadPoolExecutor(1) as pool:
        gateway.control(default_tokens=20)
        with ledger_inserts_held():
            answer = pool.submit(post, gateway, caller.key, stream=True, max_tokens=20)
            # Before, the row went in first and the provider was asked after: with the insert held, never.
            eventually(lambda: provider_requests(gateway) == 1, timeout=10)
            assert not Usage.objects.filter(user=caller.user).exists()
            assert not answer.done()  # nothing goes out before the row is in
        response = answer.result()
    assert response.status_code == 200
    assert sum(1 for e in sse_events(response.content)
               if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")) == 20
    row = settled_row(response.headers["x-request-id"])
    assert row.status == "completed" and row.completion_tokens == 20


def test_a_lease_lost_to_a_store_rebuild_before_the_row_is_in_is_taken_again_or_refused(redis_url, make_user):
    limit = 1000
    caller = make_user(tokens_per_day=limit, requests_per_minute=100)
    store = redis.Redis.from_url(redis_url)
    with gateway_server(REDIS_URL=redis_url) as gateway, ThreadPoolExecutor(2) as pool:
        gateway.control(default_tokens=600)
        with ledger_inserts_held():
            # A leases ~607 tokens (prompt + its whole max_tokens: not streamed), asks the provider, and waits for
            # its row ...
            first = pool.submit(post, gateway, caller.key, max_tokens=600)
            eventually(lambda: provider_requests(gateway) == 1, timeout=10)
            store.flushdb()  # ... when the counter store loses everything,
            # and B's lease rebuilds the day's window from a ledger without A's row: B gets A's tokens.
            second = pool.submit(post, gateway, caller.key, max_tokens=600)
            eventually(lambda: provider_requests(gateway) == 2, timeout=10)
        first, second = first.result(), second.result()
        # A, finding its lease gone once its row was in, asks again: no room for its answer, refused; B answers.
        assert (first.status_code, second.status_code) == (429, 200), (first.text[:300], second.text[:300])
        assert first.json()["error"]["code"] == "insufficient_quota"
        assert second.json()["usage"]["completion_tokens"] == 600
        refused = settled_row(first.headers["x-request-id"])
        assert (refused.status, refused.charged_tokens) == ("rejected", 0)
        rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user)).filter(status="streaming").count() == 0
                          and q, timeout=10)
        charged = rows.aggregate(charged=Sum("charged_tokens"))["charged"]
        quota = httpx2.get(gateway.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"}).json()
    assert quota["tokens"]["day"]["used"] == charged <= limit
