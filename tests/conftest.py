"""Shared fixtures. The helpers they use (gateway processes, polling, SSE decoding) are in tests/support/."""

import itertools
import os
import sys
from types import SimpleNamespace

import httpx2
import pytest

from bench.servers import start_server
from tests.support.gateways import REDIS_TEST_URL, RUNNING, eventually, gateway_server


@pytest.fixture(scope="session", autouse=True)
def _database_threads(django_db_setup, django_db_blocker):
    """Close the connections of quotas/domain/db.py's threads (code the tests run in-process) before the test database
    is dropped: PostgreSQL refuses to drop a database that still has sessions."""
    yield
    from django.db import connection

    from quotas.domain import db

    with django_db_blocker.unblock():
        db.close_connections()
        if connection.vendor == "postgresql":
            # And any session another thread of this process left open (Channels' database_sync_to_async in the
            # live-panel tests), which would make the drop fail and leave the test database behind.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(autouse=True)
def _fresh_catalogue():
    """Each test starts from the catalogue its own records or settings make (streaming/catalogue/registry.py)."""
    from streaming.catalogue import registry

    registry.invalidate()
    yield
    registry.invalidate()


@pytest.fixture(scope="session")
def gateway(django_db_setup, django_db_blocker):
    """One Daphne-with-backpressure gateway for the session, on the test database."""
    with gateway_server() as running:
        yield running


@pytest.fixture
def sim(gateway):
    """The session gateway with its simulated upstream's switches reset before and after."""
    gateway.reset()
    yield gateway
    gateway.reset()


_names = itertools.count()


@pytest.fixture
def make_user(transactional_db):
    """make_user(**limits) -> namespace(user, key): a user with its own plan and a fresh API key."""
    from django.contrib.auth import get_user_model

    from quotas.models import ApiKey, Plan, UserQuota

    def make(staff=False, **limits):
        n = next(_names)
        user = get_user_model().objects.create_user(f"user{n}-{os.getpid()}", password="a-long-test-password",
                                                    is_staff=staff, is_superuser=staff)
        plan = Plan.objects.create(name=f"plan-{user.username}", **limits)
        UserQuota.objects.create(user=user, plan=plan)
        _, raw = ApiKey.issue(user, name="test")
        return SimpleNamespace(user=user, key=raw, plan=plan)

    yield make
    # A gateway may still be settling a stream whose client has gone: let it, before the test's database is
    # flushed (PostgreSQL's TRUNCATE and the settlement's writes would deadlock). A gateway that is not
    # answering (killed by the test) settles nothing, hence the bound.
    for gateway in RUNNING:
        try:
            eventually(lambda: gateway.unsettled() == 0, timeout=5)
        except (AssertionError, httpx2.HTTPError, StopIteration):
            pass


@pytest.fixture
def redis_url():
    """A clean Redis database for the test, or skip where no Redis runs (CI always has one)."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Redis at " + REDIS_TEST_URL)
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()




@pytest.fixture(scope="session")
def dialects():
    """The provider of other servers' wire formats (tests/support/dialects.py), in a process of its own."""
    command = [sys.executable, "-m", "uvicorn", "tests.support.dialects:app", "--host", "127.0.0.1", "--port",
               "{port}", "--log-level", "warning", "--loop", "asyncio"]
    with start_server(command) as server:
        yield server
