"""The deployment behind nginx (config/deploy/): `config/deploy/serve` starts two gateway processes on the test
database (and a shared Redis when one runs) with Debian's nginx in front, on config/deploy/nginx.conf; every request
here goes through nginx, over raw sockets where the test needs to stop reading.

Each gateway serves its own simulated provider at /_sim, reached by the gateway directly (not through nginx), so
the tests set both simulators alike and ask each which requests it served. Skipped where /usr/sbin/nginx is absent
(`./dev test` installs Debian's nginx when it can). docs/architecture.md, "Behind nginx", lists which directive each
test catches when it is missing.
"""

import base64
import json
import os
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import psutil
import pytest

from bench.servers import PROJECT_ROOT, RunningServer, free_port, start_server
from tests.support.gateways import METRICS_TOKEN, REDIS_TEST_URL, RUNNING, Gateway, eventually, plateau, server_env, settled_row

NGINX = Path("/usr/sbin/nginx")
SERVE = PROJECT_ROOT / "config" / "deploy" / "serve"
# The site configuration under test; SLUICE_TEST_NGINX_CONF swaps in another (to check that the tests catch a
# broken one, e.g. with proxy_buffering on).
SITE_CONFIG = Path(os.environ.get("SLUICE_TEST_NGINX_CONF") or PROJECT_ROOT / "config" / "deploy" / "nginx.conf")
STALL_TIMEOUT_SECONDS = 6.0

BIG = {"tokens_per_day": 10**9, "tokens_per_month": 10**9, "max_tokens_per_request": 10**6,
       "requests_per_minute": 1000}
# ~260 bytes per event: ~100 MB, several times what the kernel buffers along client → nginx → gateway (loopback
# autotunes a socket's receive buffer up to tcp_rmem's 32 MB here), so a paused provider cannot be mistaken for one
# that finished.
TOKENS = 400_000
PADDING = 200


@dataclass
class Deployment:
    port: int  # nginx's
    gateways: list  # tests.support.gateways.Gateway, one per process, reached directly
    pids: dict  # gateway port -> its process id, and "nginx" -> nginx's worker
    redis: bool

    def control(self, **switches):
        for gateway in self.gateways:
            gateway.reset()
            if switches:
                gateway.control(**switches)

    def log(self):
        """What the script, the gateways and nginx wrote to stderr (the last of it)."""
        return self.gateways[0].server.stderr_text()[-4000:]

    def served_by(self, request_id):
        """The gateway whose provider got the upstream request of `request_id` (None before it has)."""
        return next((gateway for gateway in self.gateways if gateway.sim_request(request_id)), None)


def _shared_redis():
    """REDIS_TEST_URL flushed, or None where no Redis runs (as the redis_url fixture decides, for a whole module)."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
        return REDIS_TEST_URL
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        return None
    finally:
        client.close()


@pytest.fixture(scope="module")
def deployment(django_db_setup, django_db_blocker):
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"no {NGINX}: the deployment tests need Debian's nginx (./dev test installs it)")
    redis_url = _shared_redis()
    ports = [free_port()]
    while len(ports) < 2:
        ports = [*{*ports, free_port()}]
    argv = [sys.executable, str(SERVE), "--listen", "127.0.0.1:{port}", "--ports", ",".join(map(str, ports)),
            "--config", str(SITE_CONFIG), "--nginx", str(NGINX)]
    env = server_env(REDIS_URL=redis_url or "", STREAM_STALL_TIMEOUT=STALL_TIMEOUT_SECONDS, SHUTDOWN_DRAIN_SECONDS=2)
    with start_server(argv, env=env, ready_timeout_seconds=90, stop_timeout_seconds=30) as serve:
        script = psutil.Process(serve.process.pid)
        # nginx listens before it forks its worker.
        worker = eventually(lambda: [c for c in script.children(recursive=True)
                                     if c.name() == "nginx" and c.ppid() != script.pid], timeout=10)
        children = script.children(recursive=True)
        pids = {port: next(c.pid for c in children if str(port) in c.cmdline()) for port in ports}
        pids["nginx"] = worker[0].pid
        gateways = [Gateway(RunningServer("127.0.0.1", port, serve.process, serve.stdout_path, serve.stderr_path))
                    for port in ports]
        RUNNING.extend(gateways)  # make_user's teardown waits for them to settle their streams
        try:
            yield Deployment(serve.port, gateways, pids, bool(redis_url))
        finally:
            for gateway in gateways:
                RUNNING.remove(gateway)
                gateway.http.close()
    # Everything the script started has stopped with it.
    left = [child for child in children if _alive(child)]
    for child in left:
        child.kill()
    assert not left, serve.stderr_text()
    if redis_url:
        _shared_redis()


def _alive(process):
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def request(port, method, path, *, headers=(), body=b"", rcvbuf=None):
    """Send one request on a fresh socket; return (socket, status, headers by lower-cased name, body bytes read so
    far)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect(): the window scale
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response's head: {received!r}"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}
    return sock, int(status_line.split()[1]), fields, rest


def post_completion(port, key, max_tokens, rcvbuf=None):
    body = json.dumps({"model": "sim-small", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "go"}]}).encode()
    # As the OpenAI SDK sends it: a proxy that compressed the stream would hold it back to fill its buffers.
    return request(port, "POST", "/v1/chat/completions", rcvbuf=rcvbuf, body=body, headers=[
        f"Authorization: Bearer {key}", "Content-Type: application/json", "Accept-Encoding: gzip, deflate"])


def read_until(sock, received, marker):
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {received[-300:]!r}"
        received += chunk
    return received


def json_body(received):
    """The JSON object in a response body (chunked or not)."""
    return json.loads(received[received.index(b"{"):received.rindex(b"}") + 1])


def read_response(sock, received=b""):
    """Read on to the end of a chunked response (its last chunk) or of the connection."""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def websocket_message(sock, received=b""):
    """The payload of the first (unmasked, unfragmented) text frame a server sends."""
    def at_least(size):
        nonlocal received
        while len(received) < size:
            chunk = sock.recv(65536)
            assert chunk, f"the WebSocket closed: {received!r}"
            received += chunk

    at_least(2)
    assert received[0] == 0x81, received[:2]  # FIN, text
    length, start = received[1], 2
    if length == 126:
        at_least(4)
        length, start = int.from_bytes(received[2:4], "big"), 4
    at_least(start + length)
    return received[start:start + length]


def rss(pid):
    return psutil.Process(pid).memory_info().rss


def metric(gateway, line_start):
    text = gateway.http.get(gateway.base_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_an_event_reaches_the_client_before_the_stream_ends_with_its_request_id(deployment, make_user):
    caller = make_user(**BIG)
    deployment.control(tokens_per_second=10, default_tokens=20)  # 2 s, a few KB: less than one nginx buffer
    sock, status, headers, received = post_completion(deployment.port, caller.key, max_tokens=20)
    with sock:
        assert status == 200 and headers["content-type"] == "text/event-stream", (headers, received, deployment.log())
        assert "content-encoding" not in headers  # compressed, a stream waits for the compressor's buffers
        request_id = headers["x-request-id"]
        received = read_until(sock, received, b'"content":" ')
        # The first token is through nginx while the provider is still writing the answer.
        record = deployment.served_by(request_id).sim_request(request_id)
        assert not record["finished"] and record["tokens_sent"] < 20, record
        received = read_until(sock, received, b"data: [DONE]")
    assert received.count(b'"content":" ') == 20
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens, row.user_id) == ("completed", 20, caller.user.pk)


def test_nginx_reuses_its_connections_to_the_gateways(deployment):
    nginx = psutil.Process(deployment.pids["nginx"])
    gateway_ports = {gateway.server.port for gateway in deployment.gateways}

    def upstream_connections():
        return {c.laddr.port for c in nginx.net_connections("tcp")
                if c.raddr and c.raddr.port in gateway_ports and c.status == psutil.CONN_ESTABLISHED}

    cached = upstream_connections()  # idle ones, from earlier requests
    used = set()
    for _ in range(8):
        sock, status, _, _ = request(deployment.port, "GET", "/healthz")
        sock.close()
        assert status == 200
        used |= upstream_connections()
    # Kept open after each response (keepalive), and used again: one at a time, the requests needed at most one new
    # connection per gateway.
    assert used and len(used - cached) <= len(gateway_ports), (cached, used)


def test_a_client_that_stops_reading_pauses_the_provider_through_nginx(deployment, make_user):
    caller = make_user(**BIG)
    deployment.control(default_tokens=TOKENS, token_padding=PADDING)
    memory_before = {pid: rss(pid) for pid in deployment.pids.values()}
    sock, status, headers, _ = post_completion(deployment.port, caller.key, TOKENS, rcvbuf=4096)
    with sock:
        assert status == 200
        request_id = headers["x-request-id"]
        gateway = eventually(lambda: deployment.served_by(request_id), timeout=5)
        produced = plateau(lambda: gateway.sim_request(request_id)["tokens_sent"])
        record = gateway.sim_request(request_id)
        # The provider wrote a small part of the stream and its write is blocked: nginx did not read the rest.
        assert produced < TOKENS / 4, produced
        assert record["blocked_now"] and not record["finished"], record
        # Memory stays bounded along the way: not the ~100 MB the provider would send.
        grown = {pid: rss(pid) - before for pid, before in memory_before.items()}
        assert max(grown.values()) < 32 * 2**20, grown
    eventually(lambda: gateway.sim_request(request_id)["disconnected"], timeout=10)
    row = settled_row(request_id, timeout=10)
    assert row.status in ("client_disconnected", "client_stalled"), row.status
    assert row.peak_buffered_bytes <= 64 * 1024 + 4096
    assert row.backpressure_pauses > 0


def test_a_client_that_stops_reading_is_cut_off_at_the_stall_timeout(deployment, make_user):
    caller = make_user(**{**BIG, "concurrent_streams": 1})
    deployment.control(default_tokens=TOKENS, token_padding=PADDING)
    started = time.monotonic()
    sock, status, headers, _ = post_completion(deployment.port, caller.key, TOKENS, rcvbuf=4096)
    with sock:
        assert status == 200
        request_id = headers["x-request-id"]
        row = settled_row(request_id, timeout=STALL_TIMEOUT_SECONDS + 30)
        assert time.monotonic() - started > STALL_TIMEOUT_SECONDS
        assert row.status == "client_stalled", row.status
        assert 0 < row.completion_tokens < TOKENS, row.completion_tokens
        # The client, reading again, gets what nginx and the kernel still held, then the end of the response (the
        # gateway ends it; nginx passes the end on): a stream without its [DONE].
        rest = read_response(sock)
        assert len(rest) > 1_000_000 and b"data: [DONE]" not in rest
    # Its concurrency slot is free again: a second stream is admitted (limit 1).
    deployment.control(default_tokens=5)
    sock, status, headers, received = post_completion(deployment.port, caller.key, 5)
    with sock:
        assert status == 200, (status, received)
        read_until(sock, received, b"data: [DONE]")


@pytest.mark.redis
def test_one_concurrency_limit_holds_across_both_processes(deployment, make_user):
    if not deployment.redis:
        pytest.skip("no Redis at " + REDIS_TEST_URL + ": each process would keep its own counters")
    limit, extra = 3, 5
    caller = make_user(**{**BIG, "concurrent_streams": limit})
    deployment.control(tokens_per_second=20, default_tokens=1000)  # 50 s: open until closed here
    reason = 'sluice_refusals_total{reason="concurrency_limit_exceeded"}'
    refused_before = [metric(gateway, reason) for gateway in deployment.gateways]
    with ThreadPoolExecutor(limit + extra) as pool:
        responses = list(pool.map(lambda _: post_completion(deployment.port, caller.key, 1000), range(limit + extra)))
    try:
        admitted = [headers["x-request-id"] for _, status, headers, _ in responses if status == 200]
        refused = [json_body(read_until(sock, body, b"}}"))["error"]["code"]
                   for sock, status, _, body in responses if status == 429]
        assert len(admitted) == limit and refused == ["concurrency_limit_exceeded"] * extra, (admitted, refused)
        # Both processes took requests: with a count per process, each would have admitted up to `limit`.
        served = [sum(1 for request_id in admitted if gateway.sim_request(request_id))
                  + metric(gateway, reason) - before for gateway, before in zip(deployment.gateways, refused_before)]
        assert sum(served) == limit + extra and min(served) > 0, served
    finally:
        for sock, *_ in responses:
            sock.close()


def test_an_api_body_is_refused_past_sluices_limit_with_its_error(deployment, make_user):
    caller = make_user(**BIG)
    auth = [f"Authorization: Bearer {caller.key}", "Content-Type: application/json"]
    # Exactly the limit reaches Sluice (here, its answer to a body that is not JSON) ...
    sock, status, headers, body = request(deployment.port, "POST", "/v1/chat/completions", headers=auth,
                                          body=b"x" * 1_000_000)
    with sock:
        assert status == 400 and "x-request-id" in headers, (status, body)
    # ... one byte more gets nginx's refusal, in the API's own error format.
    sock, status, headers, body = request(deployment.port, "POST", "/v1/chat/completions", headers=auth,
                                          body=b"x" * 1_000_001)
    with sock:
        body = read_until(sock, body, b"}}")
    # Refused at the edge: no gateway saw it (a gateway's answer carries an x-request-id).
    assert status == 413 and headers["content-type"] == "application/json" and "x-request-id" not in headers
    assert json_body(body)["error"]["code"] == "request_too_large"


def test_staff_sign_in_and_the_live_panel_work_through_nginx(deployment, make_user):
    staff = make_user(staff=True).user
    origin = f"http://127.0.0.1:{deployment.port}"
    with httpx2.Client(base_url=origin, timeout=10) as http:
        form = http.get("/accounts/login/").text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
        credentials = {"username": staff.username, "password": "a-long-test-password", "csrfmiddlewaretoken": token}
        # nginx overwrites X-Forwarded-Proto: a client on plain HTTP cannot pass for HTTPS (CSRF's origin check).
        spoofed = http.post("/accounts/login/", data=credentials,
                            headers={"Origin": f"https://127.0.0.1:{deployment.port}", "X-Forwarded-Proto": "https"})
        assert spoofed.status_code == 403
        # The browser's own Origin matches the host and port nginx passes on.
        signed_in = http.post("/accounts/login/", data=credentials, headers={"Origin": origin})
        assert signed_in.status_code == 302, signed_in.text[:500]
        session = http.cookies["sessionid"]
    key = base64.b64encode(os.urandom(16)).decode()
    sock, status, headers, received = request(deployment.port, "GET", "/ws/admin/live/", headers=[
        "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        f"Origin: {origin}", f"Cookie: sessionid={session}"])
    with sock:
        assert status == 101 and headers["upgrade"].lower() == "websocket", (status, headers)
        snapshot = json.loads(websocket_message(sock, received))
    assert snapshot["type"] == "snapshot"



def test_the_documentation_gives_the_configuration_under_test():
    configuration = (PROJECT_ROOT / "config" / "deploy" / "nginx.conf").read_text()
    assert f"```nginx\n{configuration}```" in (PROJECT_ROOT / "docs" / "architecture.md").read_text()
