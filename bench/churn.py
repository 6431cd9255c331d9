"""A gateway's RSS under churn: rounds of paced streams through one process, this checkout against a git ref.

    python -m bench.churn [--against HEAD~1] [--pairs 2] [--streams 500] [--rounds 5] [--rate 100]

The 1,000-stream level measures the memory of streams that are all alive at once; a server that runs for days also
holds what its finished streams leave behind until the collector frees it. Each run starts a gateway, warms it, then
sends `--rounds` rounds of `--streams` streams (200 tokens at `--rate` tokens/s, sent over 2 s, as
`bench_backpressure`'s many-streams level does), one round after another, and prints its RSS after start and after
each round, and its CPU; alternating this checkout (A) with a temporary `git worktree` of `--against` (B), `--pairs`
times. docs/performance.md, "Session 13" (no request object in a reference cycle).
"""

import argparse
import asyncio

from . import bench_backpressure
from .common import SERVERS, bench_database, gateway_env, raise_nofile, simulator
from .paced_ab import alternate, worktree
from .servers import PROJECT_ROOT, start_server


def measure(db, sim, cwd, streams, rounds):
    with start_server(SERVERS["serve"], env=gateway_env(db, sim.port), cwd=cwd, ready_timeout_seconds=60) as gw:
        monitor, _ = bench_backpressure.warmed(gw, db, "serve")
        rss = [monitor.rss() / 2**20]
        for _ in range(rounds):
            results = asyncio.run(bench_backpressure.many_streams(gw.port, db.api_key, streams))
            failed = sum(1 for r in results if not r.ok)
            if failed:
                raise RuntimeError(f"{failed} of {streams} streams failed in {cwd}")
            rss.append(monitor.rss() / 2**20)
        return rss, monitor.cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git ref to compare with (default HEAD)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s of each stream (default 100)")
    args = parser.parse_args(argv)
    raise_nofile()
    with worktree(args.against) as other, bench_database() as db, simulator(tokens_per_second=args.rate) as sim:
        runs = alternate("churn", args.pairs, {"B": other, "A": str(PROJECT_ROOT)},
                         lambda cwd: measure(db, sim, cwd, args.streams, args.rounds))
    print(f"\n## Gateway RSS (MB) after start and after each of {args.rounds} rounds of {args.streams} streams "
          f"(200 tokens at {args.rate:g} tokens/s), alternating\n")
    print(f"A = this checkout, B = {args.against}\n")
    for name in ("A", "B"):
        for rss, cpu in runs[name]:
            print(f"- {name}: {' → '.join(f'{v:.1f}' for v in rss)}; CPU {cpu:.1f} s")


if __name__ == "__main__":
    main()
