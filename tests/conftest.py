"""Shared fixtures: real gateway processes on loopback, sharing the test database.

The test database is SQLite (a file) by default, or PostgreSQL when DATABASE_URL is set; every
gateway process a test starts connects to that same database, so rows a test creates (committed,
with `transactional_db`) are what the server sees, and the ledger rows the server writes are what
the test reads.
"""

import itertools
import json
import os
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import httpx2
import pytest
from django.db import connection

from tests.servers import start_server

# A Redis database of its own per test run (runs on one machine may overlap).
REDIS_TEST_URL = os.environ.get("SLUICE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}")

SERVERS = {
    "daphne": [sys.executable, "-m", "streaming.serve", "-b", "127.0.0.1", "-p", "{port}", "config.asgi:application"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                "--port", "{port}", "--no-access-log", "--log-level", "warning", "--loop", "asyncio"],
}


@pytest.fixture(scope="session", autouse=True)
def _database_threads(django_db_setup, django_db_blocker):
    """Close the connections of quotas/db.py's threads (code the tests run in-process) before the test database
    is dropped: PostgreSQL refuses to drop a database that still has sessions."""
    yield
    from django.db import connection

    from quotas import db

    with django_db_blocker.unblock():
        db.close_connections()
        if connection.vendor == "postgresql":
            # And any session another thread of this process left open (Channels' database_sync_to_async in the
            # live-panel tests), which would make the drop fail and leave the test database behind.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")


METRICS_TOKEN = "tests-metrics-token"
RUNNING = []  # the gateways running now (make_user waits for them to settle their requests)


def database_url():
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def server_env(**overrides):
    env = {
        "DATABASE_URL": database_url(),
        "DJANGO_SECRET_KEY": os.environ["DJANGO_SECRET_KEY"],
        "REDIS_URL": "",
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "LOG_LEVEL": "WARNING",
        # Fast heartbeats, so the tests see them quickly.
        "STREAM_HEARTBEAT_INTERVAL": "1",
        # Tests that make the upstream fail must not open the session gateway's breaker for the next
        # tests, nor wait long for retries; tests/streaming/test_resilience.py sets its own.
        "UPSTREAM_BREAKER_THRESHOLD": "0",
        "UPSTREAM_RETRY_DEADLINE": "2",
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Gateway:
    """A running gateway process with its in-process simulated upstream at /_sim."""

    def __init__(self, server):
        self.server = server
        self.base_url = server.base_url
        self.api_url = server.base_url + "/v1"
        self.sim_url = server.base_url + "/_sim"
        self.http = httpx2.Client(timeout=10)

    def control(self, **switches):
        response = self.http.post(self.sim_url + "/control", json=switches)
        response.raise_for_status()
        return response.json()

    def reset(self):
        self.http.post(self.sim_url + "/control/reset").raise_for_status()

    def stats(self):
        return self.http.get(self.sim_url + "/stats").json()

    def unsettled(self):
        """Completions this gateway admitted and has not settled yet (ledger row and counters)."""
        text = self.http.get(self.base_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("sluice_requests_unsettled "))

    def sim_request(self, request_id):
        """The simulator's record of the upstream request made for the gateway's `request_id`."""
        for record in self.stats()["requests"]:
            if record["client_request_id"] == request_id:
                return record
        return None


@contextmanager
def gateway_server(server="daphne", **env):
    with start_server(SERVERS[server], env=server_env(**env)) as running:
        gateway = Gateway(running)
        RUNNING.append(gateway)
        try:
            yield gateway
        finally:
            RUNNING.remove(gateway)
            gateway.http.close()


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


def sse_events(body: bytes):
    """The `data:` payloads of an SSE body, JSON-decoded (except [DONE])."""
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events


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


def eventually(check, timeout=5.0, interval=0.02):
    """Poll `check()` until it returns a truthy value (returned) or `timeout` passes (AssertionError).

    For state another process settles after the client saw its last byte (ledger rows, counters).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: last value {value!r}")
        time.sleep(interval)


def settled_row(request_id, timeout=5.0):
    """The ledger row of `request_id` once its stream has settled."""
    from quotas.models import Usage

    return eventually(lambda: Usage.objects.exclude(status="streaming").filter(request_id=request_id).first(),
                      timeout)
