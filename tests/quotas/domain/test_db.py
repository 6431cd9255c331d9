"""quotas/domain/db.py: the hot path's queries run on long-lived threads that keep (and heal) their connections."""

import asyncio
import threading

import pytest
from django.db import DatabaseError, connection

from quotas.domain import db
from quotas.models import Plan

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def one_thread(settings):
    db.close_connections()
    settings.DB_THREADS = 1
    yield
    db.close_connections()


def current_connection():
    # The DB-API connection itself, not its id(): a replaced connection, once freed, may be given the same address.
    connection.ensure_connection()
    return threading.get_ident(), connection.connection


def test_queries_keep_their_thread_and_connection(one_thread):
    async def scenario():
        seen = {await db.run(current_connection) for _ in range(20)}
        plans = await db.run(lambda: Plan.objects.count())
        return seen, plans

    seen, plans = asyncio.run(scenario())
    # Twenty jobs, one thread, one connection (Django's sync_to_async under ASGI: a thread and a connection
    # per request).
    assert len(seen) == 1 and seen.pop()[0] != threading.get_ident()
    assert plans == Plan.objects.count()


@pytest.mark.skipif(connection.vendor == "sqlite", reason="an SQLite connection cannot be lost (is_usable is always true)")
def test_a_broken_connection_is_replaced_before_the_next_job(one_thread):
    def break_it():
        connection.ensure_connection()
        connection.connection.close()  # the server went away under Django
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except DatabaseError:
            return connection.errors_occurred
        return None

    async def scenario():
        before = await db.run(current_connection)
        broken = await db.run(break_it)
        after = await db.run(current_connection)
        count = await db.run(lambda: Plan.objects.count())
        return before, broken, after, count

    before, broken, after, count = asyncio.run(scenario())
    assert broken is True
    assert after[0] == before[0] and after[1] is not before[1]  # same thread, new connection
    assert count == Plan.objects.count()
