"""Gateway CPU per request (2-token answers), this checkout against a git ref, in alternating runs.

    python -m bench.request_ab [--against HEAD~1] [--rounds 4] [--seconds 12] [--concurrency 4]

What a request costs once — its admission (key, limits, slot, lease), the ledger's insert and settlement, the
provider's request, Django's and Daphne's share — is a few milliseconds; at 200 tokens it is ~10 µs of each paced
token, too little for `bench.paced_ab` to tell a 0.3 ms change apart. This runs 2-token answers at full speed,
`--concurrency` at a time, for `--seconds` per run, and divides the gateway's CPU (`/proc`) by the requests served;
each round runs this checkout (A) and a temporary `git worktree` of `--against` (B) on the same database and
simulator, alternating, so that a shared machine's drift hits both (docs/performance.md, "Session 12").
"""

import argparse
import time

from . import bench_gateway
from .common import SERVERS, ProcessMonitor, bench_database, gateway_env, raise_nofile, simulator
from .paced_ab import alternate, worktree
from .servers import PROJECT_ROOT, start_server

BATCH = 200  # requests per closed-loop batch; a run is whole batches until --seconds have passed


def measure(db, sim, cwd, seconds, concurrency):
    """(ms of gateway CPU a request, requests served) for one run."""
    with start_server(SERVERS["serve"], env=gateway_env(db, sim.port), cwd=cwd, ready_timeout_seconds=60) as gw:
        monitor = ProcessMonitor(gw.process.pid)
        bench_gateway.run_level(gw.port, db.api_key, 1, 5)  # the catalogue's bootstrap, the first connections
        bench_gateway.run_level(gw.port, db.api_key, concurrency, BATCH, 2)  # warm
        served, started, before = 0, time.monotonic(), monitor.cpu()
        while time.monotonic() - started < seconds:
            results, _ = bench_gateway.run_level(gw.port, db.api_key, concurrency, BATCH, 2)
            if not all(r.ok for r in results):
                raise RuntimeError(f"failed requests in a run of {cwd}")
            served += len(results)
        return (monitor.cpu() - before) / served * 1000, served


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.request_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git ref to compare with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0, help="per run (default 12)")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    raise_nofile()
    with worktree(args.against) as other, bench_database() as db, simulator() as sim:
        sim.control(tokens_per_second=0)
        runs = alternate("request A/B", args.rounds, {"A": str(PROJECT_ROOT), "B": other},
                         lambda cwd: measure(db, sim, cwd, args.seconds, args.concurrency))
    print(f"\n## Gateway CPU per request (ms), 2-token answers at full speed, {args.concurrency} at a time, "
          f"{args.seconds:g} s a run, alternating\n")
    print(f"A = this checkout, B = {args.against}\n")
    for name in ("A", "B"):
        values = [ms for ms, _ in runs[name]]
        print(f"- {name}: {' / '.join(f'{v:.2f}' for v in values)}; mean {sum(values) / len(values):.2f} "
              f"({' / '.join(str(n) for _, n in runs[name])} requests)")


if __name__ == "__main__":
    main()
