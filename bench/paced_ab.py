"""Gateway CPU per paced token, this checkout against a git ref, in alternating runs.

    python -m bench.paced_ab [--against HEAD~1] [--rounds 3] [--tokens 200] [--streams 100] [--split]
                             [--env-a NAME=VALUE] [--env-b NAME=VALUE]

On a shared machine the same code measures ±10 % from one run to the next (docs/performance.md, "Run-to-run
noise"), so a change to the per-token path is judged only by alternating runs: each round starts a gateway from
this checkout (A) and one from a temporary `git worktree` of `--against` (B), on the same database and simulator,
and runs the gateway bench's paced level on each (`bench_gateway.PACED_LEVEL`: 50 concurrent streams at 50
tokens/s, one token per event). It prints every run's µs of gateway CPU per token and the means, and with
`--split` the cost per request and per token (CPU = per request × requests + per token × tokens, from 50- and
600-token answers). The worktree is removed at the end.
"""

import argparse
import contextlib
import subprocess
import tempfile

import psutil

from . import bench_gateway
from .common import SERVERS, ProcessMonitor, bench_database, gateway_env, raise_nofile, say, simulator
from .servers import PROJECT_ROOT, start_server


@contextlib.contextmanager
def worktree(ref):
    with tempfile.TemporaryDirectory(prefix="sluice-ab-") as parent:
        path = f"{parent}/tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", path, ref], cwd=PROJECT_ROOT, check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", path], cwd=PROJECT_ROOT, check=False)


def alternate(label, rounds, trees, run):
    """{name: [run(cwd) for each round]}, the trees ({name: checkout}) taking turns within each round."""
    runs = {name: [] for name in trees}
    for number in range(rounds):
        for name, cwd in trees.items():
            say(f"{label}: round {number + 1}, {name}")
            runs[name].append(run(cwd))
    return runs


def measure(db, sim, cwd, streams, tokens, me, env=None):
    concurrency, _, _, rate = bench_gateway.PACED_LEVEL
    with start_server(SERVERS["serve"], env=gateway_env(db, sim.port, **(env or {})), cwd=cwd,
                      ready_timeout_seconds=60) as gw:
        monitor = ProcessMonitor(gw.process.pid)
        sim.control(tokens_per_second=0)
        bench_gateway.run_level(gw.port, db.api_key, 1, 5)  # the catalogue's bootstrap, the first connections
        sim.control(tokens_per_second=rate)
        bench_gateway.run_level(gw.port, db.api_key, concurrency, concurrency, tokens)  # warm
        with monitor:
            row = bench_gateway.measure(gw.port, db.api_key, concurrency, streams, tokens, rate, monitor, monitor, me)
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} errors: {row['error_kinds']}")
    return row["gw_cpu_us"]


def _described(env):
    return f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""


def split(short, long, short_tokens, long_tokens):
    """(ms per request, µs per token) from the µs per token of two answer lengths."""
    per_request = (short - long) / (1 / short_tokens - 1 / long_tokens)
    return per_request / 1000, long - per_request / long_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.paced_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git ref to compare with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=bench_gateway.TOKENS, help="tokens per answer (default 200)")
    parser.add_argument("--streams", type=int, default=100, help="streams per run (default 100)")
    parser.add_argument("--split", action="store_true", help="also the cost per request and per token")
    parser.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE",
                        help="set in A's gateway environment (repeatable): with --against HEAD, a setting's A/B")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE",
                        help="set in B's gateway environment (repeatable)")
    args = parser.parse_args(argv)
    envs = {"A": dict(pair.split("=", 1) for pair in args.env_a), "B": dict(pair.split("=", 1) for pair in args.env_b)}
    raise_nofile()
    me = psutil.Process()
    runs = {"A": [], "B": []}
    splits = {"A": [], "B": []}
    with worktree(args.against) as other, bench_database() as db, simulator() as sim:
        trees = {"A": str(PROJECT_ROOT), "B": other}
        for number in range(args.rounds):
            for name, cwd in trees.items():
                say(f"paced A/B: round {number + 1}, {name}")
                runs[name].append(measure(db, sim, cwd, args.streams, args.tokens, me, envs[name]))
                if args.split:
                    short = measure(db, sim, cwd, 200, 50, me, envs[name])
                    long = measure(db, sim, cwd, 50, 600, me, envs[name])
                    splits[name].append(split(short, long, 50, 600))
        sim.control(tokens_per_second=0)
    print(f"\n## Gateway CPU per paced token (µs), {args.streams} streams × {args.tokens} tokens, alternating\n")
    print(f"A = this checkout{_described(envs['A'])}, B = {args.against}{_described(envs['B'])}\n")
    for name in ("A", "B"):
        values = runs[name]
        print(f"- {name}: {' / '.join(f'{v:.1f}' for v in values)}; mean {sum(values) / len(values):.1f}")
        if splits[name]:
            print(f"  per request / per token: "
                  + "; ".join(f"{ms:.2f} ms + {us:.0f} µs" for ms, us in splits[name]))


if __name__ == "__main__":
    main()
