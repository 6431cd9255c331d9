"""Real gateway processes on loopback for the tests, sharing the test database, and helpers to read what they did.

The test database is SQLite (a file) by default, or PostgreSQL when DATABASE_URL is set; every gateway process a
test starts connects to that same database, so rows a test creates (committed, with `transactional_db`) are what
the server sees, and the ledger rows the server writes are what the test reads.
"""

import json
import os
import re
import socket
import sys
from contextlib import contextmanager

import httpx2
from django.db import connection

from bench.servers import start_server

# A Redis database of its own per test run (runs on one machine may overlap).
# A Redis database of the test process's own (tests flush it): by pytest-xdist worker (./dev test runs two), else by pid.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_DATABASE = 1 + (int(_WORKER[2:]) if _WORKER[2:].isdigit() else os.getpid()) % 15
REDIS_TEST_URL = os.environ.get("SLUICE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_DATABASE}")

SERVERS = {
    "daphne": [sys.executable, "-m", "streaming.server", "-b", "127.0.0.1", "-p", "{port}", "config.asgi:application"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                "--port", "{port}", "--no-access-log", "--log-level", "warning", "--loop", "asyncio"],
}


METRICS_TOKEN = "tests-metrics-token"
# The simulated upstream's switches are off without it (config/asgi.py); Gateway.control/reset/stats send it.
SIMULATOR_CONTROL_TOKEN = "tests-simulator-control-token"
SIMULATOR_AUTH = {"Authorization": f"Bearer {SIMULATOR_CONTROL_TOKEN}"}
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
        # tests, nor wait long for retries; tests/streaming/provider/test_retries.py sets its own.
        "UPSTREAM_BREAKER_THRESHOLD": "0",
        "UPSTREAM_RETRY_DEADLINE": "2",
        "METRICS_TOKEN": METRICS_TOKEN,
        "SIMULATOR_CONTROL_TOKEN": SIMULATOR_CONTROL_TOKEN,
        # Gateways of different upstreams share the test database: each serves what its settings say unless a
        # test writes catalogue records (tests/streaming/catalogue/), and sees them come and go within 0.2 s.
        "SLUICE_CATALOGUE_BOOTSTRAP": "0",
        "SLUICE_CATALOGUE_REFRESH": "0.2",
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
        response = self.http.post(self.sim_url + "/control", json=switches, headers=SIMULATOR_AUTH)
        response.raise_for_status()
        return response.json()

    def reset(self):
        self.http.post(self.sim_url + "/control/reset", headers=SIMULATOR_AUTH).raise_for_status()

    def stats(self):
        return self.http.get(self.sim_url + "/stats", headers=SIMULATOR_AUTH).json()

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


# The password conftest's make_user gives every user.
PASSWORD = "a-long-test-password"


def sign_in(http, username: str) -> str:
    """A session on the gateway, as the browser gets one; returns the CSRF token for X-CSRFToken."""
    form = http.get("/accounts/login/").text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    response = http.post("/accounts/login/", data={"username": username, "password": PASSWORD,
                                                   "csrfmiddlewaretoken": token})
    assert response.status_code == 302, response.text[:300]
    return http.cookies["csrftoken"]


def sse_events(body: bytes):
    """The `data:` payloads of an SSE body, JSON-decoded (except [DONE])."""
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events


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


def plateau(read, settle_seconds=0.5, timeout=30):
    """Poll `read()` until two readings `settle_seconds` apart agree; return the value (a buffer that stopped
    growing, a provider that stopped writing)."""
    import time

    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(settle_seconds)  # the interval between two samples, not a synchronisation
        value = read()
        if value == last:
            return value
        last = value
    raise AssertionError(f"still growing after {timeout} s: {last}")


def settled_row(request_id, timeout=5.0):
    """The ledger row of `request_id` once its stream has settled."""
    from quotas.models import Usage

    return eventually(lambda: Usage.objects.exclude(status="streaming").filter(request_id=request_id).first(),
                      timeout)


def open_stream(gateway, key, max_tokens=1000):
    """Send a streaming request on a raw socket; return (socket, request id, response head) once the headers came."""
    body = (b'{"model": "sim-small", "stream": true, "max_tokens": %d, '
            b'"messages": [{"role": "user", "content": "go"}]}' % max_tokens)
    sock = socket.create_connection(("127.0.0.1", gateway.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id"))
    return sock, request_id, head


def counted_stream(gateway, key, tokens, **fields):
    """A stream of `tokens` simulated tokens at 400 a second through the gateway, checked whole: every token in order,
    once, then [DONE], and its ledger row settled as completed with them. Returns (request id, the events)."""
    from streaming.simulator.app import WORDS

    gateway.reset()
    gateway.control(tokens_per_second=400, default_tokens=tokens)
    body = {"model": "sim-small", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "count"}], **fields}
    with httpx2.Client(timeout=30) as http:
        response = http.post(gateway.api_url + "/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["delta"]["content"] for e in events[:-1]
             if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert texts == [f" {WORDS[i % len(WORDS)]}" for i in range(tokens)]
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens) == ("completed", tokens)
    return request_id, events
