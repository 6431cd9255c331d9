"""Resilience under a provider that takes only N requests at a time: `python -m bench.bench_resilience`.

The simulated upstream runs in its own process with `max_concurrent=N` (429 + Retry-After beyond that); one
gateway (Daphne with backpressure) per configuration; 200 clients stream chat completions in a closed loop. The
same load runs against four configurations, each in a fresh gateway:

- resilient: the defaults — retries before the first byte, the shared AIMD limit and its fair queue;
- retries off: UPSTREAM_RETRY_DEADLINE=0, the limit and queue kept;
- retries only: no limit (UPSTREAM_CONCURRENCY_MAX=0), retries on — what a retry storm costs the provider;
- pass-through: neither.

Reported: upstream attempts per successful request, the 429s the provider had to send, lost requests (any
client request that did not end with [DONE]), client latency p50/p99 (request sent to [DONE]), and ratios to the
resilient run. The load generator is bench.common's raw-socket client: on a 2-core machine the openai SDK would
use more CPU than the gateway it measures.
"""

import argparse
import asyncio
import sys
import time

from bench.common import (bench_database, chat_body, closed_loop, fmt, gateway, gateway_env, percentile,
                          raise_nofile, say, simulator, stream_chat, summarize_errors, table)

CONFIGS = {
    "resilient": {},
    "retries off": {"UPSTREAM_RETRY_DEADLINE": 0},
    "retries only": {"UPSTREAM_CONCURRENCY_MAX": 0},
    "pass-through": {"UPSTREAM_RETRY_DEADLINE": 0, "UPSTREAM_CONCURRENCY_MAX": 0},
}


def measure(db, sim, name, overrides, args):
    # The settings' defaults, stated so the table does not depend on the caller's environment.
    env = gateway_env(db, sim.port, **{
        "UPSTREAM_CONCURRENCY_MAX": 64, "UPSTREAM_CONCURRENCY_MIN": 1, "UPSTREAM_RETRY_DEADLINE": 20,
        "UPSTREAM_QUEUE_TIMEOUT": args.queue_timeout, "UPSTREAM_BREAKER_THRESHOLD": 5,
        **dict(setting.split("=", 1) for setting in args.set or ()), **overrides})
    sim.reset(max_concurrent=args.provider_concurrency, tokens_per_second=args.tokens_per_second,
              retry_after_seconds=args.retry_after)
    body = chat_body(args.tokens)
    with gateway("serve", env) as server:
        say(f"{name}: {args.clients} clients, {args.requests} requests")
        results, wall = asyncio.run(closed_loop(
            args.clients, args.requests, lambda: stream_chat(server.port, "/v1/chat/completions", body, db.api_key)))
    stats = sim.stats()
    ok = [r for r in results if r.ok]
    latencies = [r.ended_at - r.sent_at for r in ok]
    return {
        "name": name, "ok": len(ok), "lost": len(results) - len(ok), "errors": summarize_errors(results),
        "attempts": stats["attempts"], "rejected": stats["rejected_429"],
        "per_success": stats["attempts"] / len(ok) if ok else None,
        "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "wall": wall,
    }


def ratio(value, base):
    return None if value is None or not base else value / base


def report(rows, args):
    base = next((r for r in rows if r["name"] == "resilient"), rows[0])
    print(f"\n## Resilience: a provider that takes {args.provider_concurrency} requests at a time "
          f"({args.clients} clients, {args.requests} streamed requests of {args.tokens} tokens at "
          f"{args.tokens_per_second:g} tokens/s, Retry-After {args.retry_after:g} s)\n")
    print(table(
        ["configuration", "ok", "lost", "upstream attempts", "429s at the provider", "attempts / success",
         "p50 s", "p99 s", "wall s", "ok / s", f"attempts / success ÷ {base['name']}", f"ok / s ÷ {base['name']}"],
        [(r["name"], r["ok"], r["lost"], r["attempts"], r["rejected"], fmt(r["per_success"], ".2f"),
          fmt(r["p50"], ".2f"), fmt(r["p99"], ".2f"), fmt(r["wall"], ".1f"), fmt(r["ok"] / r["wall"], ".1f"),
          fmt(ratio(r["per_success"], base["per_success"]), ".2f"),
          fmt(ratio(r["ok"] / r["wall"], base["ok"] / base["wall"]), ".2f"))
         for r in rows]))
    for r in rows:
        if r["errors"]:
            print(f"- {r['name']}: {r['errors']}")
    print("\nLatency (request sent to [DONE]) is over successful requests only; a refused request returns at once.")
    print(f"{base['name']}: {base['lost']} requests lost ({'zero lost: MET' if not base['lost'] else 'NOT MET'})")


def run(argv=()):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_resilience", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=400, help="streamed requests in all")
    parser.add_argument("--provider-concurrency", type=int, default=8, help="the simulator's max_concurrent")
    parser.add_argument("--tokens", type=int, default=50, help="completion tokens per request")
    parser.add_argument("--tokens-per-second", type=float, default=100.0)
    parser.add_argument("--retry-after", type=float, default=1.0, help="the provider's Retry-After on 429")
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a gateway setting for every configuration, e.g. UPSTREAM_AIMD_DECREASE_FACTOR=0.75")
    parser.add_argument("--only", choices=list(CONFIGS), action="append", help="run only these configurations")
    args = parser.parse_args(list(argv))
    raise_nofile()
    started = time.monotonic()
    rows = []
    with bench_database() as db, simulator() as sim:
        for name, overrides in CONFIGS.items():
            if not args.only or name in args.only:
                rows.append(measure(db, sim, name, overrides, args))
    report(rows, args)
    print(f"\n(resilience: {time.monotonic() - started:.0f} s)")
    return rows


def main():
    run(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
