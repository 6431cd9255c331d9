"""Fairness between users at a shared upstream: `python -m bench fairness` (or `python -m bench.bench_fairness`).

Two users share one gateway and its upstream limit (UPSTREAM_CONCURRENCY_MAX, small on purpose). User B runs a few
clients in a closed loop of short streamed chats; its throughput alone is the baseline. Then, each in a fresh
gateway, B runs again while user A

- never-read: keeps 200 streams open and never reads them (small socket buffers, so that the relay pauses and the
  provider's writes block at once), reopening any that is refused; or
- bad bodies: floods requests the provider fails on (HTTP 500, as a body that crashes it would) and requests it
  rejects (HTTP 400).

Reported per run: B's completed chats per second and ratio to solo, B's 429s and 503s, and what A got. The runs
with Sluice's fairness rules (fair shares with preemption; the breaker's two-user rule) must keep B at ≥ 90 % of
its solo throughput with no 429 or 503 (docs/resilience.md, "Fairness"): the process exits 1 otherwise. The same
loads against the rules switched off (UPSTREAM_FAIR_SHARE=0; UPSTREAM_BREAKER_MIN_USERS=1) are printed for
comparison, not asserted.

The upstream is `provider` below, in its own process: the simulator, with two more models (`sim-poison`: 500,
`sim-rejects`: 400) and A's never-read streams served by a second, unpaced simulator (`sim-flood`) so that B's
chats keep their own pace.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from bench.common import (HOST, PROJECT_ROOT, PY, BenchDatabase, chat_body, fmt, gateway, gateway_env, http_request,
                          raise_nofile, say, secret_key, stream_chat, table, verdict)
from bench.servers import start_server
from streaming.simulator.app import Simulator

PATH = "/v1/chat/completions"
MODELS = "sim-small,sim-flood,sim-poison,sim-rejects"
# The gateway's settings for every run: a small shared limit (the finding's was ~25 concurrent requests).
LIMIT = 8
SETTINGS = {"UPSTREAM_CONCURRENCY_MAX": LIMIT, "UPSTREAM_CONCURRENCY_MIN": 1, "SLUICE_MODELS": MODELS,
            "UPSTREAM_BREAKER_THRESHOLD": 5, "UPSTREAM_BREAKER_COOLDOWN": 10, "UPSTREAM_RETRY_DEADLINE": 5,
            "UPSTREAM_QUEUE_TIMEOUT": 10, "STREAM_STALL_TIMEOUT": 30, "UPSTREAM_PREEMPT_AFTER": 5}
RULES_OFF = {"never-read": {"UPSTREAM_FAIR_SHARE": 0}, "bad bodies": {"UPSTREAM_BREAKER_MIN_USERS": 1}}
TARGET = 0.9


# The upstream ---------------------------------------------------------------------------------------------------

class Provider:
    """The simulator, with two models it fails on (`sim-poison`: 500, `sim-rejects`: 400) and one it serves from a
    second simulator (`sim-flood`), whose switches are under /flood/control. /stats: both simulators' stats and the
    attempts per model."""

    def __init__(self):
        self.main = Simulator()
        self.flood = Simulator()
        self.attempts = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.main(scope, receive, send)
        path = scope["path"]
        if path == "/stats":
            await _read(receive)
            return await _json(send, 200, {"main": self.main.state.snapshot(), "flood": self.flood.state.snapshot(),
                                           "attempts": self.attempts})
        if path == "/control/reset":
            self.attempts.clear()
            await self.flood(scope, _replay(b"", receive), _discard)
        if path.startswith("/flood/"):
            return await self.flood({**scope, "path": path[len("/flood"):]}, receive, send)
        if not path.endswith("/chat/completions"):
            return await self.main(scope, receive, send)
        body = await _read(receive)
        model = json.loads(body or b"{}").get("model", "")
        self.attempts[model] += 1
        if model == "sim-poison":
            return await _json(send, 500, {"error": {"message": "The server had an error processing your request.",
                                                     "type": "server_error", "param": None, "code": None}})
        if model == "sim-rejects":
            return await _json(send, 400, {"error": {"message": "Invalid value for 'temperature'.",
                                                     "type": "invalid_request_error", "param": "temperature",
                                                     "code": None}})
        simulator = self.flood if model == "sim-flood" else self.main
        return await simulator(scope, _replay(body, receive), send)


async def _read(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _replay(body, receive):
    """A `receive` that gives the body already read, then the connection's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


async def _discard(message):
    pass


async def _json(send, status, payload):
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


provider = Provider()
PROVIDER_COMMAND = [PY, "-m", "uvicorn", "bench.bench_fairness:provider", "--host", HOST, "--port", "{port}",
                    "--log-level", "warning", "--no-access-log", "--loop", "asyncio"]


@contextmanager
def provider_server():
    with start_server(PROVIDER_COMMAND) as server, httpx2.Client(base_url=server.base_url, timeout=30,
                                                                 trust_env=False) as http:
        yield server, http


# The bench database: two users on generous plans --------------------------------------------------------------

SETUP_SCRIPT = r"""
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from django.contrib.auth import get_user_model
from quotas.models import ApiKey, Plan, UserQuota
for name in ("a", "b"):
    user = get_user_model().objects.create_user(name, password="bench-password-not-used")
    plan = Plan.objects.create(name=name, tokens_per_day=10**12, tokens_per_month=10**13,
                               requests_per_minute=1_000_000, concurrent_streams=10_000,
                               max_tokens_per_request=1_000_000)
    UserQuota.objects.create(user=user, plan=plan)
    print(ApiKey.issue(user, name="bench")[1])
"""


@dataclass
class Users:
    db: BenchDatabase
    a: str  # API keys
    b: str


@contextmanager
def two_users():
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        path = Path(tmp, "bench.sqlite3")
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": f"sqlite:///{path}",
               "DJANGO_SECRET_KEY": secret_key(), "REDIS_URL": "", "LOG_LEVEL": "WARNING"}
        done = subprocess.run([PY, "-c", SETUP_SCRIPT], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench database setup failed:\n{done.stderr}")
        a, b = done.stdout.strip().splitlines()[-2:]
        yield Users(BenchDatabase(path, a), a, b)


# The clients -----------------------------------------------------------------------------------------------------

@dataclass
class Figures:
    """What one user's clients got."""

    ok: int = 0
    statuses: Counter = field(default_factory=Counter)  # by HTTP status (and "error" for a broken stream)
    seconds: float = 0.0

    def count(self, result):
        if result.ok:
            self.ok += 1
        else:
            self.statuses["error" if result.status == 200 else result.status] += 1

    @property
    def per_second(self):
        return self.ok / self.seconds if self.seconds else 0.0

    def refusals(self):
        return self.statuses[429] + self.statuses[503]

    def describe(self):
        return ", ".join(f"{n}× {status}" for status, n in sorted(self.statuses.items(), key=str)) or "-"


async def chats(port, key, clients, seconds, tokens, stop=None):
    """B: `clients` workers streaming short chats back to back for `seconds`."""
    figures = Figures()
    body = chat_body(tokens)
    deadline = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < deadline:
            figures.count(await stream_chat(port, PATH, body, key))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    figures.seconds = time.monotonic() - started
    return figures


class NeverReaders:
    """A: `count` streams that are read up to their response head, then never again; a refused one is reopened."""

    def __init__(self, port, key, count, tokens):
        self.port, self.key, self.count = port, key, count
        self.body = json.dumps({"model": "sim-flood", "stream": True, "max_tokens": tokens,
                                "messages": [{"role": "user", "content": "Say everything."}]}).encode()
        self.figures = Figures()
        self.holding = 0
        self._stop = asyncio.Event()
        self._tasks = []

    def start(self):
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.count)]

    async def stop(self):
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self):
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Small buffers, set before connecting: the gateway's writes block after ~100 KB instead of megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (HOST, self.port))
                await loop.sock_sendall(sock, http_request(self.port, PATH, self.body, self.key))
                head = await self._head(loop, sock)
                status = int(head.split(b" ", 2)[1]) if head else 0
                if status == 200:
                    self.figures.ok += 1
                    self.holding += 1
                    try:
                        await self._stop.wait()  # never read again
                    finally:
                        self.holding -= 1
                elif not self._stop.is_set():  # (a request still waiting for its head when A stops is not counted)
                    self.figures.statuses[status or "error"] += 1
            except OSError:
                self.figures.statuses["error"] += 1
            finally:
                sock.close()
            if not self._stop.is_set():
                await asyncio.sleep(0.2)

    async def _head(self, loop, sock):
        data = b""
        while b"\r\n\r\n" not in data:
            stop = asyncio.ensure_future(self._stop.wait())
            read = asyncio.ensure_future(loop.sock_recv(sock, 4096))
            done, _ = await asyncio.wait([stop, read], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if read not in done:
                read.cancel()
                return b""
            piece = read.result()
            if not piece:
                return data
            data += piece
        return data


async def bad_bodies(port, key, clients, pause, stop):
    """A: `clients` workers sending requests the provider fails on (500) or rejects (400), until `stop`."""
    figures = Figures()
    bodies = [chat_body(20, model="sim-poison"), chat_body(20, model="sim-rejects")]

    async def worker(i):
        while not stop.is_set():
            figures.count(await stream_chat(port, PATH, bodies[i % 2], key))
            i += 1
            await asyncio.sleep(pause)

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    figures.seconds = time.monotonic() - started
    return figures


# The runs --------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    rules: str  # "on" or what was switched off
    b: Figures
    a: Figures | None = None
    a_note: str = ""


def gateway_settings(users, provider_port, args, overrides=None):
    return gateway_env(users.db, provider_port, **{**SETTINGS, "UPSTREAM_PREEMPT_AFTER": args.preempt_after,
                                                   **(overrides or {})})


def run_solo(users, provider_port, http, args):
    http.post("/control/reset").raise_for_status()
    http.post("/control", json={"tokens_per_second": args.tokens_per_second}).raise_for_status()
    with gateway("serve", gateway_settings(users, provider_port, args)) as server:
        say(f"solo: B, {args.clients} clients for {args.seconds:g} s")
        b = asyncio.run(chats(server.port, users.b, args.clients, args.seconds, args.tokens))
    return Run("solo", "on", b)


def run_never_read(users, provider_port, http, args, rules_off=False):
    http.post("/control/reset").raise_for_status()
    http.post("/control", json={"tokens_per_second": args.tokens_per_second}).raise_for_status()
    http.post("/flood/control", json={"token_padding": 200, "default_tokens": 100_000}).raise_for_status()
    overrides = RULES_OFF["never-read"] if rules_off else {}
    with gateway("serve", gateway_settings(users, provider_port, args, overrides)) as server:
        async def scenario():
            readers = NeverReaders(server.port, users.a, args.streams, 100_000)
            readers.start()
            # A holds every permit, and its streams have stalled (the provider's writes to them are blocked) for
            # longer than UPSTREAM_PREEMPT_AFTER, before B starts: the finding's situation.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                flood = (await asyncio.to_thread(http.get, "/stats")).json()["flood"]
                if sum(r["blocked_now"] for r in flood["requests"]) >= LIMIT:
                    break
                await asyncio.sleep(0.2)
            else:
                say("A's streams never all stalled")
            await asyncio.sleep(args.preempt_after + 1)
            say(f"never-read (rules {'off' if rules_off else 'on'}): A holds {readers.holding} streams; "
                f"B, {args.clients} clients for {args.seconds:g} s")
            b = await chats(server.port, users.b, args.clients, args.seconds, args.tokens)
            # Before A's clients go: the provider requests the gateway closed meanwhile (preempted, or cut off by
            # STREAM_STALL_TIMEOUT), and how many A holds now.
            flood = (await asyncio.to_thread(http.get, "/stats")).json()["flood"]
            holding = sum(1 for r in flood["requests"] if not r["disconnected"] and not r["finished"])
            closed = sum(1 for r in flood["requests"] if r["disconnected"])
            await readers.stop()
            return b, readers, holding, closed

        b, readers, holding, closed = asyncio.run(scenario())
    note = (f"{readers.figures.ok} streams answered (never read), refused: {readers.figures.describe()}; "
            f"{closed} of its provider requests closed by the gateway, {holding} still open at the end")
    return Run("never-read", "off: UPSTREAM_FAIR_SHARE=0" if rules_off else "on", b, readers.figures, note)


def run_bad_bodies(users, provider_port, http, args, rules_off=False):
    http.post("/control/reset").raise_for_status()
    http.post("/control", json={"tokens_per_second": args.tokens_per_second}).raise_for_status()
    overrides = RULES_OFF["bad bodies"] if rules_off else {}
    with gateway("serve", gateway_settings(users, provider_port, args, overrides)) as server:
        async def scenario():
            stop = asyncio.Event()
            flood = asyncio.create_task(bad_bodies(server.port, users.a, args.bad_clients, args.bad_pause, stop))
            await asyncio.sleep(1)  # A's first failures are in
            say(f"bad bodies (rules {'off' if rules_off else 'on'}): B, {args.clients} clients for {args.seconds:g} s")
            b = await chats(server.port, users.b, args.clients, args.seconds, args.tokens)
            stop.set()
            return b, await flood

        b, a = asyncio.run(scenario())
    attempts = http.get("/stats").json()["attempts"]
    note = (f"{sum(a.statuses.values())} requests: {a.describe()}; the provider saw "
            f"{attempts.get('sim-poison', 0)} × sim-poison, {attempts.get('sim-rejects', 0)} × sim-rejects")
    return Run("bad bodies", "off: UPSTREAM_BREAKER_MIN_USERS=1" if rules_off else "on", b, a, note)


def report(runs, args):
    solo = runs[0].b.per_second
    print(f"\n## Fairness: two users, one upstream limit of {LIMIT} (B: {args.clients} clients streaming "
          f"{args.tokens}-token chats at {args.tokens_per_second:g} tokens/s for {args.seconds:g} s per run)\n")
    print(table(
        ["run", "fairness rules", "B ok", "B ok / s", "B ÷ solo", "B 429", "B 503", "B other errors", "A"],
        [(r.name, r.rules, r.b.ok, fmt(r.b.per_second, ".2f"), fmt(r.b.per_second / solo if solo else None, ".2f"),
          r.b.statuses[429], r.b.statuses[503],
          sum(n for s, n in r.b.statuses.items() if s not in (429, 503)), r.a_note or "-") for r in runs],
        ["<", "<", ">", ">", ">", ">", ">", ">", "<"]))
    checked = [r for r in runs if r.rules == "on" and r.name != "solo"]
    failed = False
    print()
    for r in checked:
        ratio = r.b.per_second / solo if solo else 0.0
        ok = ratio >= TARGET and not r.b.refusals()
        failed |= not ok
        print(f"{r.name}: B at {ratio:.0%} of its solo throughput (target ≥ {TARGET:.0%}), "
              f"{r.b.refusals()} × 429/503 (target 0): {verdict(ok)}")
    return not failed


def run(argv=()):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fairness", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="B's measurement per run")
    parser.add_argument("--clients", type=int, default=4, help="B's concurrent clients")
    parser.add_argument("--tokens", type=int, default=20, help="B's tokens per chat")
    parser.add_argument("--tokens-per-second", type=float, default=100.0, help="the provider's pace for B's chats")
    parser.add_argument("--streams", type=int, default=200, help="A's never-read streams")
    parser.add_argument("--bad-clients", type=int, default=4, help="A's clients sending bad bodies")
    parser.add_argument("--bad-pause", type=float, default=0.25, help="each bad-body client's pause (seconds)")
    parser.add_argument("--preempt-after", type=float, default=SETTINGS["UPSTREAM_PREEMPT_AFTER"],
                        help="UPSTREAM_PREEMPT_AFTER for every run")
    parser.add_argument("--no-contrast", action="store_true", help="skip the runs with the rules switched off")
    args = parser.parse_args(list(argv))
    raise_nofile()
    started = time.monotonic()
    with two_users() as users, provider_server() as (server, http):
        runs = [run_solo(users, server.port, http, args), run_never_read(users, server.port, http, args),
                run_bad_bodies(users, server.port, http, args)]
        if not args.no_contrast:
            runs += [run_never_read(users, server.port, http, args, rules_off=True),
                     run_bad_bodies(users, server.port, http, args, rules_off=True)]
    met = report(runs, args)
    print(f"\n(fairness: {time.monotonic() - started:.0f} s)")
    if not met:
        raise SystemExit(1)
    return runs


def main():
    run(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
