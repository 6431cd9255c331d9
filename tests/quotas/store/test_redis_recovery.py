"""A gateway on Redis across a Redis crash: answered 503 quickly while Redis is down, and no request fails once it
is back (issue 14: stale pooled connections used to fail once each after a restart).

Real processes, no mocks: a private redis-server on a free port (killed with SIGKILL and restarted on the same
port) and a real gateway process pointed at it.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter

import httpx2
import pytest
import redis

from bench.servers import free_port
from tests.support.gateways import eventually, gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
BODY = {"model": "sim-small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
LIMITS = dict(tokens_per_day=10**8, tokens_per_month=10**9, requests_per_minute=100_000, concurrent_streams=1000)


class PrivateRedis:
    """A redis-server of the test's own (no persistence), which the test can kill and start again on its port."""

    def __init__(self, directory):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(self.answers, timeout=10)

    def answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}")
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return client.ping()
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def clients(self):
        """The connections open to this Redis, the caller's own excluded."""
        client = redis.Redis(port=self.port)
        try:
            return len(client.client_list()) - 1
        finally:
            client.close()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.kill()


@pytest.fixture
def private_redis():
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip(f"no redis-server at {REDIS_SERVER}")
    with tempfile.TemporaryDirectory(prefix="sluice-redis-") as directory:
        server = PrivateRedis(directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def post(gateway, key):
    """One non-streaming completion: (status, error code or None, seconds taken)."""
    started = time.monotonic()
    response = httpx2.post(gateway.api_url + "/chat/completions", json=BODY, timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
    code = response.json().get("error", {}).get("code") if response.status_code != 200 else None
    return response.status_code, code, time.monotonic() - started


def burst(gateway, key, concurrent, rounds=1):
    """`rounds` batches of `concurrent` simultaneous completions; the (status, error code) of each."""

    async def run():
        async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=concurrent)) as client:
            async def one():
                response = await client.post(gateway.api_url + "/chat/completions", json=BODY,
                                             headers={"Authorization": f"Bearer {key}"})
                code = response.json().get("error", {}).get("code") if response.status_code != 200 else None
                return response.status_code, code

            results = []
            for _ in range(rounds):
                results += await asyncio.gather(*(one() for _ in range(concurrent)))
            return results

    return asyncio.run(run())


def fill_the_pool(gateway, key, server, at_least=5):
    """Concurrent requests until the gateway holds several connections to Redis (idle, once they are answered)."""
    statuses = burst(gateway, key, concurrent=20, rounds=3)
    assert Counter(statuses) == Counter({(200, None): 60}), Counter(statuses)
    assert server.clients() >= at_least, f"the gateway opened only {server.clients()} Redis connections"


def test_no_request_fails_once_redis_is_back(private_redis, make_user):
    caller = make_user(**LIMITS)
    with gateway_server(REDIS_URL=private_redis.url) as gateway:
        fill_the_pool(gateway, caller.key, private_redis)
        pooled = private_redis.clients()

        private_redis.kill()
        private_redis.start()  # same port; returns once it answers PING
        time.sleep(1)  # not synchronisation: the measure counts from 1 s after Redis is back

        statuses = burst(gateway, caller.key, concurrent=40)
        statuses += [post(gateway, caller.key)[:2] for _ in range(40)]
        counts = Counter(statuses)
        failed = sum(n for (status, _), n in counts.items() if status == 503)
        assert failed == 0, f"{failed} of {len(statuses)} answered 503 ({pooled} pooled connections): {counts}"
        assert counts == Counter({(200, None): 80}), counts


def test_while_redis_is_down_the_gateway_answers_503_quickly_then_recovers(private_redis, make_user):
    caller = make_user(**LIMITS)
    with gateway_server(REDIS_URL=private_redis.url) as gateway:
        fill_the_pool(gateway, caller.key, private_redis)

        private_redis.kill()
        down = [post(gateway, caller.key) for _ in range(10)]
        assert {(status, code) for status, code, _ in down} == {(503, "service_unavailable")}, down
        slowest = max(seconds for _, _, seconds in down)
        assert slowest < 2.0, f"a request took {slowest:.2f} s with Redis down"
        # Concurrent requests are refused as promptly (no request waits for another's reconnection attempts).
        started = time.monotonic()
        assert set(burst(gateway, caller.key, concurrent=20)) == {(503, "service_unavailable")}
        assert time.monotonic() - started < 4.0

        private_redis.start()
        # Right after Redis answers PING, without any grace period.
        statuses = [post(gateway, caller.key)[:2] for _ in range(10)] + burst(gateway, caller.key, concurrent=20)
        assert Counter(statuses) == Counter({(200, None): 30}), Counter(statuses)
