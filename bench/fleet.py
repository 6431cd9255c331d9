"""Several processes on one port: 1 against 2 gateway processes of `python -m streaming.server.fleet`, sharing
PostgreSQL and Redis, on this machine.

    python -m bench.fleet            # or: ./dev bench fleet          (about 60 s on 2 cores)

For each fleet size the same load runs through the fleet's one port (each stream a new connection, which the kernel
gives to one process's SO_REUSEPORT socket):

- full speed: 50 concurrent streams, 400 streams of 200 tokens, the simulator as fast as it can;
- paced: 200 concurrent streams of 100 tokens at 20 tokens/s (5 s each), 400 streams, as models stream.

It prints requests/s, content tokens/s, TTFT p50/p99, the gateway's CPU per token summed over the fleet's children
(psutil's cpu_times, i.e. /proc/<pid>/stat's utime + stime), each child's share of that CPU, and the simulator's
CPU per token. Then one global limit: a user whose plan allows LIMIT_TOKENS tokens a day and LIMIT_STREAMS
concurrent streams is sent LIMIT_CLIENTS clients at once until each is refused for its quota; the ledger's
charged tokens must not exceed the day's limit, both processes must have served that user, and the concurrency
limit must have refused some requests (the limit was contended across the processes).

Needs PostgreSQL (a database of its own, created and dropped: FLEET_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/postgres, names the server) and the redis-server binary (a private server).
"""

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import psutil

from .common import (
    APP, HOST, PROJECT_ROOT, PY, chat_body, closed_loop, describe_scheduling, fmt, gateway_env, log_exceptions, mb,
    percentile, private_redis, raise_nofile, say, secret_key, shorten_time_slice, simulator, stream_chat,
    summarize_errors, table, verdict,
)
from .servers import start_server

ADMIN_URL = os.environ.get("FLEET_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PATH = "/v1/chat/completions"
SIZES = (1, 2)
# (label, concurrent streams, streams in all, tokens per stream, upstream tokens/s; 0 = full speed)
LEVELS = [("full speed", 50, 400, 200, 0), ("paced", 200, 400, 100, 20)]
WARMUP = 10
# The global limit: a day's tokens and concurrent streams, contended by more clients than streams it allows.
LIMIT_TOKENS, LIMIT_STREAMS, LIMIT_CLIENTS = 20_000, 8, 16
LIMIT_STREAM_TOKENS, LIMIT_TOKENS_PER_SECOND = 200, 400  # half-second streams
LIMIT_DEADLINE_SECONDS = 120.0
LIMIT_BACKOFF_SECONDS = 0.02  # a client refused for concurrency tries again after this
READY_TIMEOUT_SECONDS = 120.0

SETUP_SCRIPT = r"""
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from django.contrib.auth import get_user_model
from quotas.models import ApiKey, Plan, UserQuota

def user(name, **limits):
    user = get_user_model().objects.create_user(name, password="bench-password-not-used")
    UserQuota.objects.create(user=user, plan=Plan.objects.create(name=name, **limits))
    print(user.pk, ApiKey.issue(user, name="bench")[1])

user("bench", tokens_per_day=10**12, tokens_per_month=10**13, requests_per_minute=1_000_000,
     concurrent_streams=10_000, max_tokens_per_request=1_000_000)
for size in SIZES:
    user(f"limited-{size}", tokens_per_day=LIMIT_TOKENS, tokens_per_month=10**13, requests_per_minute=1_000_000,
         concurrent_streams=LIMIT_STREAMS, max_tokens_per_request=1_000_000)
"""


# The database: PostgreSQL, a database of this run's own ---------------------------------------------------------

@contextmanager
def postgres_database():
    """(URL, [(user id, API key)]: the generous user, then one limited user per fleet size)."""
    import psycopg

    name = f"sluice_fleet_bench_{os.getpid()}"
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(ADMIN_URL)._replace(scheme="postgres", path=f"/{name}"))
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": url,
               "DJANGO_SECRET_KEY": secret_key(), "REDIS_URL": "", "LOG_LEVEL": "WARNING"}
        script = f"SIZES, LIMIT_TOKENS, LIMIT_STREAMS = {SIZES!r}, {LIMIT_TOKENS}, {LIMIT_STREAMS}\n" + SETUP_SCRIPT
        done = subprocess.run([PY, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench database setup failed:\n{done.stderr}")
        users = [(int(line.split()[0]), line.split()[1]) for line in done.stdout.strip().splitlines()[-1 - len(SIZES):]]
        yield url, users
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ledger_of(url, user_id):
    """(charged tokens, admitted rows, rows still streaming) of a user's ledger."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(
            "SELECT coalesce(sum(charged_tokens), 0), count(*) FILTER (WHERE status <> 'rejected'), "
            "count(*) FILTER (WHERE status = 'streaming') FROM quotas_usage WHERE user_id = %s", (user_id,)).fetchone()


# The fleet ------------------------------------------------------------------------------------------------------

@contextmanager
def fleet(size, env):
    argv = [PY, "-m", "streaming.server.fleet", "--processes", str(size), "--pid-header", "-b", HOST, "-p", "{port}",
            APP]
    with start_server(argv, env=env, ready_timeout_seconds=60) as server:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while "fleet ready" not in server.stderr_text():
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fleet of {size} did not start:\n{server.stderr_text()[-3000:]}")
            time.sleep(0.1)
        try:
            yield server
        finally:
            log_exceptions(server.stderr_text(), f"fleet-{size}-stderr")


def cpu_seconds(processes):
    """User + system CPU seconds of each process (psutil reads /proc/<pid>/stat)."""
    return [sum(process.cpu_times()[:2]) for process in processes]


# Throughput -----------------------------------------------------------------------------------------------------

def measure(server, children, sim, key, level):
    label, concurrency, total, tokens, rate = level
    sim.control(tokens_per_second=rate)
    body = chat_body(tokens)
    simulator_process = psutil.Process(sim.pid)
    before, sim_before = cpu_seconds(children), cpu_seconds([simulator_process])[0]
    results, wall = asyncio.run(closed_loop(concurrency, total, lambda: stream_chat(server.port, PATH, body, key)))
    used = [after - start for after, start in zip(cpu_seconds(children), before)]
    sim_used = cpu_seconds([simulator_process])[0] - sim_before
    streamed = sum(r.tokens for r in results)
    ttfts = [r.ttft * 1000 for r in results if r.ok and r.ttft is not None]
    return {
        "label": label, "size": len(children), "concurrency": concurrency, "streams": total, "tokens": tokens,
        "rate": rate, "errors": sum(not r.ok for r in results), "error_kinds": summarize_errors(results),
        "requests_per_s": total / wall, "tokens_per_s": streamed / wall,
        "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
        "cpu_us": sum(used) / streamed * 1e6 if streamed else None,
        "cpu_shares": [u / sum(used) * 100 for u in used] if sum(used) else [],
        "sim_cpu_us": sim_used / streamed * 1e6 if streamed else None,
        "by_server": Counter(r.server for r in results if r.ok),
    }


# The global limit -------------------------------------------------------------------------------------------------

def error_code(result):
    found = re.search(r'"code": ?"(\w+)"', result.error)
    return found.group(1) if found else (result.error[:40] or None)


async def contend(port, key):
    """LIMIT_CLIENTS clients streaming until each is refused for its quota (or the deadline passes)."""
    body = chat_body(LIMIT_STREAM_TOKENS)
    results = []
    deadline = time.monotonic() + LIMIT_DEADLINE_SECONDS

    async def client():
        while time.monotonic() < deadline:
            result = await stream_chat(port, PATH, body, key)
            results.append(result)
            code = error_code(result)
            if code == "insufficient_quota":
                return
            if code is not None:
                await asyncio.sleep(LIMIT_BACKOFF_SECONDS)

    await asyncio.gather(*(client() for _ in range(LIMIT_CLIENTS)))
    return results


def check_limit(server, sim, url, user):
    user_id, key = user
    sim.control(tokens_per_second=LIMIT_TOKENS_PER_SECOND)
    results = asyncio.run(contend(server.port, key))
    deadline = time.monotonic() + 30
    while (ledger := ledger_of(url, user_id))[2] and time.monotonic() < deadline:  # rows still settling
        time.sleep(0.1)
    charged, admitted, streaming = ledger
    return {"charged": charged, "admitted": admitted, "unsettled": streaming,
            "delivered": sum(r.tokens for r in results),
            "by_server": Counter(r.server for r in results if r.status == 200),
            "refusals": Counter(error_code(r) for r in results if error_code(r))}


# The run ----------------------------------------------------------------------------------------------------------

def run_size(size, env, sim, url, users):
    say(f"fleet bench: {size} process{'es' if size > 1 else ''}")
    with fleet(size, env) as server:
        children = psutil.Process(server.process.pid).children()
        warm, _ = asyncio.run(closed_loop(WARMUP, WARMUP, lambda: stream_chat(server.port, PATH, chat_body(20),
                                                                              users[0][1])))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"warm-up failed: {summarize_errors(warm)}\n{server.stderr_text()[-3000:]}")
        idle = memory(server, children)
        rows = []
        for level in LEVELS:
            say(f"fleet bench: {size} process(es), {level[0]}: {level[1]} concurrent, {level[2]} × {level[3]} tokens")
            rows.append(measure(server, children, sim, users[0][1], level))
        loaded = memory(server, children)
        say(f"fleet bench: {size} process(es), one global limit")
        limit = check_limit(server, sim, url, users[SIZES.index(size) + 1])
        scheduling = describe_scheduling([child.pid for child in children])
    return rows, limit, scheduling, (idle, loaded)


def memory(server, children):
    """(parent, [child, ...]) as (RSS, USS, PSS) in bytes: RSS counts the pages a process shares with the others
    (the libraries' code, mapped from the same files) in full; USS is what only it holds; PSS shares each shared page
    among the processes that map it, so the fleet's PSS summed is what the host pays for it."""
    def figures(process):
        info = process.memory_full_info()
        return info.rss, info.uss, info.pss
    return figures(psutil.Process(server.process.pid)), [figures(child) for child in children]


def run():
    raise_nofile()
    results = {}
    with postgres_database() as (url, users), simulator() as sim, private_redis() as redis_url:
        if redis_url is None:
            raise RuntimeError("the fleet bench needs the redis-server binary (a private Redis for the counters)")
        env = gateway_env(SimpleNamespace(url=url), sim.port, redis_url=redis_url)
        for size in SIZES:
            results[size] = run_size(size, env, sim, url, users)
    report(results)
    return results


def report(results):
    print("\n## Several processes on one port: 1 against 2 gateway processes (PostgreSQL, Redis)\n")
    print("Gateway: `python -m streaming.server.fleet --processes N` (Daphne + backpressure per process, one "
          "SO_REUSEPORT socket each); PostgreSQL and a private Redis shared by the processes; the simulator in its "
          f"own process. {next(iter(results.values()))[2]}\n")
    lines = []
    for size, (rows, *_) in results.items():
        for r in rows:
            lines.append((size, r["label"], f"{r['concurrency']} × ({r['streams']} × {r['tokens']}"
                          + (f" @ {r['rate']}/s)" if r["rate"] else ")"), r["errors"], f"{r['requests_per_s']:.1f}",
                          f"{r['tokens_per_s']:,.0f}", fmt(r["ttft_p50"], ".1f"), fmt(r["ttft_p99"], ".1f"),
                          fmt(r["cpu_us"], ".1f"), " / ".join(f"{share:.0f}" for share in r["cpu_shares"]),
                          " / ".join(str(n) for _, n in sorted(r["by_server"].items())),
                          fmt(r["sim_cpu_us"], ".1f")))
    print(table(["processes", "load", "concurrent × (streams × tokens)", "errors", "requests/s", "tokens/s",
                 "TTFT p50 ms", "TTFT p99 ms", "gateway CPU µs/token (Σ processes)", "CPU % by process",
                 "streams by process", "simulator CPU µs/token"], lines))
    errors = [f"{size} × {r['label']}: {r['error_kinds']}" for size, (rows, *_) in results.items() for r in rows
              if r["errors"]]
    if errors:
        print("\nErrors: " + " | ".join(errors))
    report_memory(results)
    report_limit(results)


def report_memory(results):
    print("\n## The fleet's memory: each process's RSS, USS (its own pages) and PSS (shared pages divided among the "
          "processes that map them), MB\n")
    lines = []
    for size, (*_, (idle, loaded)) in results.items():
        for when, (parent, children) in (("idle, warm", idle), ("after the load", loaded)):
            by_process = [" / ".join(f"{mb(f[index]):.1f}" for f in children) for index in range(3)]
            lines.append((size, when, *by_process, f"{mb(parent[0]):.1f} / {mb(parent[2]):.1f}",
                          f"{mb(parent[2] + sum(f[2] for f in children)):.1f}"))
    print(table(["processes", "when", "RSS by process", "USS by process", "PSS by process", "supervisor RSS / PSS",
                 "the fleet's PSS (Σ)"], lines))


def report_limit(results):
    print(f"\n## One global limit: {LIMIT_CLIENTS} clients, {LIMIT_STREAM_TOKENS}-token streams at "
          f"{LIMIT_TOKENS_PER_SECOND} tokens/s, a plan of {LIMIT_TOKENS:,} tokens a day and {LIMIT_STREAMS} "
          "concurrent streams\n")
    lines, checks = [], []
    for size, (_, limit, *_) in results.items():
        served = " / ".join(str(n) for _, n in sorted(limit["by_server"].items()))
        refusals = ", ".join(f"{n} {code}" for code, n in limit["refusals"].most_common())
        lines.append((size, f"{limit['charged']:,}", f"{limit['delivered']:,}", limit["admitted"], served, refusals))
        held = limit["charged"] <= LIMIT_TOKENS and limit["delivered"] <= LIMIT_TOKENS and not limit["unsettled"]
        reached = limit["charged"] >= 0.9 * LIMIT_TOKENS
        shared = len(limit["by_server"]) == size and limit["refusals"].get("concurrency_limit_exceeded", 0) > 0
        checks.append(f"- {size} process(es): charged {limit['charged']:,} ≤ {LIMIT_TOKENS:,} (delivered "
                      f"{limit['delivered']:,}) → {verdict(held)}; the limit was reached (≥ 90 %) → "
                      f"{verdict(reached)}; every process served the user and the concurrency limit refused some → "
                      f"{verdict(shared)}")
    print(table(["processes", "charged tokens (ledger)", "content tokens delivered", "admitted streams",
                 "200s by process", "refusals"], lines))
    print("\nChecks:")
    print("\n".join(checks))


def main():
    raise_nofile()
    shorten_time_slice()
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
