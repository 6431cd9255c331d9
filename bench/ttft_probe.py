"""TTFT at one stream, direct to the simulator and through the gateway, alternating, for one answer length and pace.

    python -m bench.ttft_probe [--tokens 200] [--rate 0] [--provider-ttft 0] [--requests 200] [--default-slice]

A diagnostic for the gateway bench's one-stream TTFT (docs/performance.md, "TTFT at one stream"): the same
sequential requests, in four alternating rounds of direct and gateway so that drift on a shared machine hits both,
with the answer length, the simulator's pace (tokens/s, 0 = full speed) and its own time to a first token (a real
model's is tens to hundreds of ms: what the gateway does meanwhile costs the client nothing) as parameters. It prints TTFT p50/p99
for both paths, the difference of the medians, and how long the load generator waited for a core per request.
Like `python -m bench`, it runs with a short time slice (bench/common.py, LOAD_GENERATOR_SLICE_NS) unless
`--default-slice` keeps the kernel's default, to show what the load generator's own scheduling adds.
"""

import argparse
import asyncio

from .common import (
    bench_database, chat_body, describe_scheduling, gateway, gateway_env, percentile, raise_nofile, run_queue_wait,
    shorten_time_slice, simulator, stream_chat,
)

PATH = "/v1/chat/completions"
ROUNDS = 4
WARMUP = 20


async def sequential(port, api_key, body, count):
    ttfts = []
    for _ in range(count):
        result = await stream_chat(port, PATH, body, api_key)
        if not result.ok:
            raise RuntimeError(f"request failed: {result.error}")
        ttfts.append(result.ttft * 1000)
    return ttfts


def timed_round(port, api_key, body, count, ttfts, waits):
    before = run_queue_wait()
    ttfts += asyncio.run(sequential(port, api_key, body, count))
    if before is not None:
        waits.append((run_queue_wait() - before) * 1000 / count)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ttft_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200, help="answer length (default 200)")
    parser.add_argument("--rate", type=float, default=0.0, help="simulator tokens/s, 0 = full speed (default)")
    parser.add_argument("--provider-ttft", type=float, default=0.0,
                        help="the simulator's own time to its first token, in seconds (default 0)")
    parser.add_argument("--requests", type=int, default=200, help="per path (default 200)")
    parser.add_argument("--default-slice", action="store_true",
                        help="keep the kernel's default time slice for the load generator")
    args = parser.parse_args(argv)
    raise_nofile()
    if not args.default_slice:
        shorten_time_slice()
    body = chat_body(args.tokens)
    direct, through, direct_waits, through_waits = [], [], [], []
    with bench_database() as db, simulator() as sim, gateway("serve", gateway_env(db, sim.port)) as gw:
        sim.control(tokens_per_second=args.rate, ttft_seconds=args.provider_ttft)
        asyncio.run(sequential(gw.port, db.api_key, body, WARMUP))
        asyncio.run(sequential(sim.port, None, body, WARMUP))
        for _ in range(ROUNDS):
            timed_round(sim.port, None, body, args.requests // ROUNDS, direct, direct_waits)
            timed_round(gw.port, db.api_key, body, args.requests // ROUNDS, through, through_waits)
        scheduling = describe_scheduling([gw.process.pid, sim.pid])
    pace = f"{args.rate:g} tokens/s" if args.rate else "full speed"
    if args.provider_ttft:
        pace += f", the provider's first token after {args.provider_ttft * 1000:g} ms"
    print(f"{args.tokens}-token answers at {pace}, {len(direct)} sequential requests per path. {scheduling}")
    print(f"  direct  TTFT p50 {percentile(direct, 50):.2f} ms, p99 {percentile(direct, 99):.2f} ms")
    print(f"  gateway TTFT p50 {percentile(through, 50):.2f} ms, p99 {percentile(through, 99):.2f} ms")
    print(f"  added (p50): +{percentile(through, 50) - percentile(direct, 50):.2f} ms")
    if direct_waits:
        print(f"  load generator's wait for a core per request: direct {sum(direct_waits) / ROUNDS:.2f} ms, "
              f"gateway {sum(through_waits) / ROUNDS:.2f} ms")


if __name__ == "__main__":
    main()
