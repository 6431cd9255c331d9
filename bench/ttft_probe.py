"""TTFT at one stream, direct to the simulator and through the gateway, alternating, for one answer length and pace.

    python -m bench.ttft_probe [--tokens 200] [--rate 0] [--requests 200]

A diagnostic for the gateway bench's one-stream TTFT (docs/performance.md, "Why TTFT is still over 3 ms"): the
same sequential requests, in four alternating rounds of direct and gateway so that drift on a shared machine hits
both, with the answer length and the simulator's pace (tokens/s, 0 = full speed) as parameters. It prints TTFT
p50/p99 for both paths and the difference of the medians.
"""

import argparse
import asyncio

from .common import (
    bench_database, chat_body, gateway, gateway_env, percentile, raise_nofile, simulator, stream_chat,
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ttft_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200, help="answer length (default 200)")
    parser.add_argument("--rate", type=float, default=0.0, help="simulator tokens/s, 0 = full speed (default)")
    parser.add_argument("--requests", type=int, default=200, help="per path (default 200)")
    args = parser.parse_args(argv)
    raise_nofile()
    body = chat_body(args.tokens)
    direct, through = [], []
    with bench_database() as db, simulator() as sim, gateway("serve", gateway_env(db, sim.port)) as gw:
        sim.control(tokens_per_second=args.rate)
        asyncio.run(sequential(gw.port, db.api_key, body, WARMUP))
        asyncio.run(sequential(sim.port, None, body, WARMUP))
        for _ in range(ROUNDS):
            direct += asyncio.run(sequential(sim.port, None, body, args.requests // ROUNDS))
            through += asyncio.run(sequential(gw.port, db.api_key, body, args.requests // ROUNDS))
    pace = f"{args.rate:g} tokens/s" if args.rate else "full speed"
    print(f"{args.tokens}-token answers at {pace}, {len(direct)} sequential requests per path:")
    print(f"  direct  TTFT p50 {percentile(direct, 50):.2f} ms, p99 {percentile(direct, 99):.2f} ms")
    print(f"  gateway TTFT p50 {percentile(through, 50):.2f} ms, p99 {percentile(through, 99):.2f} ms")
    print(f"  added (p50): +{percentile(through, 50) - percentile(direct, 50):.2f} ms")


if __name__ == "__main__":
    main()
