"""Quotas: Redis round trips per streamed token, and what the counter store costs in throughput.

The same load — CONCURRENCY concurrent streams of TOKENS tokens, STREAMS in all, upstream at full speed — goes
direct to the simulator (the baseline), through a gateway with the in-process store, and through a gateway with
the Redis store (REDIS_URL, which also puts the cache and the channel layer on Redis). For the Redis run the
Redis server's `INFO commandstats` is reset (`CONFIG RESETSTAT`) after the warm-up and read after the load:
commands per token and per request, by command; a short MONITOR pass then names the Lua scripts behind the
EVALSHA calls. Redis is a private `redis-server` on a free port when one is installed (its statistics then count
this benchmark only); otherwise, or with BENCH_REDIS_URL set, the shared server (default
redis://127.0.0.1:6379/14), whose statistics also count any other client's commands.
"""

import asyncio
import hashlib
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager

import redis

from .common import (
    ProcessMonitor, bench_database, chat_body, closed_loop, fmt, gateway, gateway_env, log_exceptions,
    percentile, private_redis, raise_nofile, say, simulator, stream_chat, summarize_errors, table, verdict,
)

PATH = "/v1/chat/completions"
CONCURRENCY = 50
STREAMS = 100
TOKENS = 1000
WARMUP = 3
MONITOR_STREAMS = 10
TARGET_TOKENS_PER_COMMAND = 32
SHARED_REDIS = "redis://127.0.0.1:6379/14"
# Commands this benchmark sends itself, and connection set-up: not the gateway's work.
OWN_COMMANDS = {"info", "config|resetstat", "config", "flushdb", "monitor", "hello", "client|setinfo", "client",
                "select", "ping"}


@contextmanager
def redis_url():
    if os.environ.get("BENCH_REDIS_URL"):
        yield os.environ["BENCH_REDIS_URL"], "BENCH_REDIS_URL (shared: statistics include other clients)"
        return
    with private_redis() as url:
        if url is not None:
            yield url, "a private redis-server started for this benchmark"
        else:
            yield SHARED_REDIS, "the shared server (no redis-server binary; statistics include other clients)"


def command_calls(client):
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def redis_cpu(client):
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def script_names():
    """sha1 → name of the counter store's Lua scripts (as redis-py's register_script computes it)."""
    from quotas.store import redis as store  # noqa: PLC0415 (module constants only; no settings needed)

    return {hashlib.sha1(source.encode()).hexdigest(): name for name, source in vars(store).items()
            if name.isupper() and isinstance(source, str) and "redis.call" in source}


def load(port, api_key, concurrency=CONCURRENCY, streams=STREAMS, tokens=TOKENS):
    body = chat_body(tokens)
    return asyncio.run(closed_loop(concurrency, streams, lambda: stream_chat(port, PATH, body, api_key)))


def measure(port, api_key, gw_monitor=None, redis_client=None):
    gw_cpu = gw_monitor.cpu() if gw_monitor else 0.0
    r_cpu = redis_cpu(redis_client) if redis_client else 0.0
    results, wall = load(port, api_key)
    tokens = sum(r.tokens for r in results)
    return {
        "results": results, "wall": wall, "tokens": tokens, "errors": sum(not r.ok for r in results),
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile([r.ttft * 1000 for r in results if r.ok], 50),
        "gw_cpu_us": (gw_monitor.cpu() - gw_cpu) / tokens * 1e6 if gw_monitor and tokens else None,
        "redis_cpu_us": (redis_cpu(redis_client) - r_cpu) / tokens * 1e6 if redis_client and tokens else None,
    }


def monitor_scripts(client, port, api_key):
    """Run a few streams under MONITOR: the gateway's round trips (commands it sent, EVALSHA by script name) and
    the commands its scripts ran inside Redis."""
    names = script_names()
    seen, inside = Counter(), Counter()
    stop = threading.Event()
    ready = threading.Event()

    def watch():
        with client.monitor() as monitor:
            ready.set()
            for event in monitor.listen():
                if stop.is_set():
                    return
                parts = event["command"].split()
                if not parts:
                    continue
                command = parts[0].lower()
                if event["client_type"] == "lua":
                    inside[command.upper()] += 1
                elif command == "evalsha" and len(parts) > 1:
                    seen["EVALSHA " + names.get(parts[1].strip('"'), parts[1][:8])] += 1
                elif command not in OWN_COMMANDS:
                    seen[command.upper()] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    results, _ = load(port, api_key, concurrency=MONITOR_STREAMS, streams=MONITOR_STREAMS)
    time.sleep(0.5)
    stop.set()
    client.ping()  # one more command, so that listen() returns and sees `stop`
    thread.join(5)
    return seen, inside, sum(r.tokens for r in results)


def run():
    raise_nofile()
    with bench_database() as db, simulator() as sim, redis_url() as (url, where):
        client = redis.Redis.from_url(url)
        client.flushdb()
        say(f"quotas bench: {STREAMS} streams × {TOKENS} tokens, {CONCURRENCY} concurrent: direct")
        load(sim.port, None, streams=WARMUP)
        direct = measure(sim.port, None)
        runs = {}
        for store, redis_env in (("in-process", ""), ("Redis", url)):
            say(f"quotas bench: through the gateway, {store} store")
            with gateway("serve", gateway_env(db, sim.port, redis_url=redis_env)) as gw:
                monitor = ProcessMonitor(gw.process.pid)
                warm, _ = load(gw.port, db.api_key, concurrency=1, streams=WARMUP, tokens=50)
                if not all(r.ok for r in warm):
                    raise RuntimeError(f"warm-up failed: {summarize_errors(warm)}\n{gw.stderr_text()[-3000:]}")
                redis_client = client if redis_env else None
                if redis_env:
                    client.config_resetstat()
                    before = command_calls(client)
                runs[store] = measure(gw.port, db.api_key, monitor, redis_client)
                if redis_env:
                    after = command_calls(client)
                    runs[store]["commands"] = {name: calls - before.get(name, 0) for name, calls in after.items()
                                               if name not in OWN_COMMANDS and calls - before.get(name, 0) > 0}
                    say("quotas bench: MONITOR pass to name the scripts")
                    runs[store]["scripts"] = monitor_scripts(client, gw.port, db.api_key)
                runs[store]["exceptions"] = log_exceptions(gw.stderr_text(), f"quotas-{store}-stderr")
        client.flushdb()
        client.close()
    report(direct, runs, where)


def report(direct, runs, where):
    print(f"\n## Quotas: {STREAMS} streams × {TOKENS} tokens, {CONCURRENCY} concurrent, upstream at full speed\n")
    print(f"Redis: {where}.\n")
    rows = [("direct to the simulator", direct["errors"], f"{direct['tokens_per_s']:,.0f}", "1.00",
             fmt(direct["ttft_p50"], ".1f"), "-", "-")]
    for store, r in runs.items():
        rows.append((f"gateway, {store} store", r["errors"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s'] / direct['tokens_per_s']:.2f}", fmt(r["ttft_p50"], ".1f"),
                     fmt(r["gw_cpu_us"], ".1f"), fmt(r["redis_cpu_us"], ".1f")))
    print(table(["path", "errors", "tokens/s", "vs direct", "TTFT p50 ms", "gateway CPU µs/token",
                 "Redis CPU µs/token"], rows))
    memory, red = runs["in-process"], runs["Redis"]
    print(f"\nRedis store vs in-process store: throughput {red['tokens_per_s'] / memory['tokens_per_s']:.2f}x, "
          f"gateway CPU {red['gw_cpu_us'] - memory['gw_cpu_us']:+.1f} µs/token.")
    for store, r in runs.items():
        if r["errors"]:
            print(f"{store}: {summarize_errors(r['results'])}")
        if r["exceptions"]:
            print(f"{store} gateway log: {r['exceptions']}")
    scripts, inside, monitored_tokens = red["scripts"]
    round_trips = sum(scripts.values())
    print(f"\nRound trips to Redis (commands the gateway sent, by MONITOR over {MONITOR_STREAMS} more streams of "
          f"{TOKENS} tokens, {monitored_tokens:,} tokens; EVALSHA named by script):\n")
    lines = [(name, n, f"{n / MONITOR_STREAMS:.1f}", f"{n / max(1, monitored_tokens) * 1000:.1f}")
             for name, n in scripts.most_common()]
    lines.append(("all round trips", round_trips, f"{round_trips / MONITOR_STREAMS:.1f}",
                  f"{round_trips / max(1, monitored_tokens) * 1000:.1f}"))
    print(table(["command / script", "calls", "per request", "per 1,000 tokens"], lines))
    executed = sum(inside.values())
    print(f"\nInside those scripts Redis ran {executed / max(1, monitored_tokens) * 1000:.0f} commands per 1,000 tokens "
          f"({', '.join(f'{n / max(1, monitored_tokens) * 1000:.0f} {c}' for c, n in inside.most_common(5))}).")
    commands = red["commands"]
    tokens = red["tokens"]
    evalsha = commands.get("evalsha", 0) + commands.get("eval", 0)
    print(f"Cross-check, the measured run's INFO commandstats ({STREAMS} requests, {tokens:,} tokens): "
          f"{evalsha:,} EVALSHA/EVAL = {evalsha / tokens * 1000:.1f} per 1,000 tokens; "
          f"{sum(commands.values()):,} commands executed in all (scripts' included).")
    per_trip = monitored_tokens / round_trips if round_trips else None
    print("\nTarget:")
    print(f"- ≤ 1 Redis round trip per {TARGET_TOKENS_PER_COMMAND} streamed tokens: 1 per {fmt(per_trip, '.1f')} "
          f"tokens with {TOKENS}-token streams → "
          f"{verdict(per_trip is not None and per_trip >= TARGET_TOKENS_PER_COMMAND)}")
    lease = scripts.get("EVALSHA LEASE", 0)
    if lease and monitored_tokens:
        print(f"  (the LEASE script alone: 1 per {monitored_tokens / lease:.1f} tokens, the first of them at admission; "
              f"the other {(round_trips - lease) / MONITOR_STREAMS:.0f} round trips are per request)")
