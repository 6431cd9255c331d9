"""The ledger row's insert off the first token's path (issue 20): the provider is asked while the row goes in, and a
lease that a counter store rebuild lost in the meantime is taken again, or refused, before anything is delivered.

PostgreSQL only: the tests hold the insert back with a table lock that lets the gateway's reads through (SQLite's
writer lock would hold back the whole gateway). Real processes: a gateway, its simulator, Redis.
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

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


def lease_lost_in_the_gap(redis_url, make_user, limit, tokens, first, second):
    """A's request (`first`'s fields) leases, asks the provider and waits for its row (inserts held back) when the
    counter store loses everything (FLUSHDB); then B's (`second`) lease rebuilds the day's window from a ledger without
    A's row. Both answers, and once every row settled, what the rows were charged and the day's window's use."""
    caller = make_user(tokens_per_day=limit, requests_per_minute=100)
    with gateway_server(REDIS_URL=redis_url) as gateway, ThreadPoolExecutor(2) as pool:
        gateway.control(default_tokens=tokens)
        with ledger_inserts_held():
            a = pool.submit(post, gateway, caller.key, **first)
            eventually(lambda: provider_requests(gateway) == 1, timeout=10)
            redis.Redis.from_url(redis_url).flushdb()
            b = pool.submit(post, gateway, caller.key, **second)
            eventually(lambda: provider_requests(gateway) == 2, timeout=10)
        a, b = a.result(), b.result()
        rows = eventually(lambda: (q := Usage.objects.filter(user=caller.user)).filter(status="streaming").count() == 0
                          and q, timeout=10)
        quota = httpx2.get(gateway.api_url + "/quota", headers={"Authorization": f"Bearer {caller.key}"}).json()
    return SimpleNamespace(first=a, second=b, charged=rows.aggregate(charged=Sum("charged_tokens"))["charged"],
                           used=quota["tokens"]["day"]["used"])


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
    # A leases ~607 tokens (prompt + its whole max_tokens: not streamed); B gets them from the rebuilt window.
    gap = lease_lost_in_the_gap(redis_url, make_user, 1000, 600, {"max_tokens": 600}, {"max_tokens": 600})
    # A, finding its lease gone once its row was in, asks again: no room for its answer, refused; B answers.
    assert (gap.first.status_code, gap.second.status_code) == (429, 200), (gap.first.text[:300], gap.second.text[:300])
    assert gap.first.json()["error"]["code"] == "insufficient_quota"
    assert gap.second.json()["usage"]["completion_tokens"] == 600
    refused = settled_row(gap.first.headers["x-request-id"])
    assert (refused.status, refused.charged_tokens) == ("rejected", 0)
    assert gap.used == gap.charged <= 1000


def test_a_stream_whose_lease_was_lost_goes_on_with_what_is_left(redis_url, make_user):
    # The same gap, a stream whose answer fits in its first lease block (it would never lease again): taken again
    # with the room the rebuilt window has left, and held to it.
    gap = lease_lost_in_the_gap(redis_url, make_user, 120, 90, {"stream": True, "max_tokens": 30}, {"max_tokens": 90})
    assert (gap.first.status_code, gap.second.status_code) == (200, 200), (gap.first.text[:300], gap.second.text[:300])
    taken = settled_row(gap.second.headers["x-request-id"])
    stream = settled_row(gap.first.headers["x-request-id"])
    delivered = sum(1 for e in sse_events(gap.first.content)
                    if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content"))
    # Without the check it had all 30 (its lease lost, never charged): 136 tokens delivered of a 120-token day.
    assert delivered == stream.completion_tokens == 120 - taken.charged_tokens - stream.prompt_tokens < 30
    assert gap.used == gap.charged == 120
