"""The 1,000-stream level alone, with the gateway's environment set differently in alternating runs.

    python -m bench.many_ab SLUICE_LOOP_GATE_MS=25 SLUICE_LOOP_GATE_MS=0 [--rounds 2] [--streams 1000]

Each argument is one setting (NAME=VALUE, or `-` for the environment as it is); each round runs the backpressure
bench's many-streams level (`bench_backpressure.run_many_fresh`: 200-token answers at 20 tokens/s, the requests
sent over 2 s) once per setting, in turn, each on a fresh database, simulator and gateway. It prints every run's p99
added inter-token delay (and the diagnostic split: after the last stream's first token, and before), TTFT p50/p99
the gateway's µs of CPU a token and the cores the three processes used, then the means per setting. On this shared machine one run of the level moves
by ±50 % from the next (docs/performance.md), so a setting is judged only by alternating rounds.
"""

import argparse
import os
import statistics

from . import bench_backpressure as bp
from .common import describe_scheduling, fmt, percentile, raise_nofile, say, shorten_time_slice, table


def run_with(setting, count):
    saved = dict(os.environ)
    if setting != "-":
        name, _, value = setting.partition("=")
        os.environ[name] = value  # the gateway's environment is this process's, with the bench's own on top
    try:
        m = bp.run_many_fresh(count)
        f = bp.many_row(m)
        # The cores each process used during the level: the gateway, the load generator (this process), the simulator.
        f["cores"] = tuple(m[k] / m["wall"] for k in ("cpu", "load_generator_cpu", "simulator_cpu"))
        return f
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="NAME=VALUE for the gateway's environment, or - for none")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=bp.MANY)
    args = parser.parse_args()
    raise_nofile()
    shorten_time_slice()  # as `./dev bench` does for its load generator (bench/common.py says why)
    runs = {setting: [] for setting in args.settings}
    rows = []
    for number in range(args.rounds):
        for setting in args.settings:
            say(f"many_ab: round {number + 1}, {setting}")
            f = run_with(setting, args.streams)
            runs[setting].append(f)
            rows.append((number + 1, setting, f["errors"], fmt(percentile(f["added"], 99), ".1f"),
                         fmt(percentile(f["added_after_admissions"], 99), ".1f"),
                         fmt(percentile(f["added_during_admissions"], 99), ".1f"),
                         fmt(percentile(f["ttfts"], 50), ".0f"), fmt(percentile(f["ttfts"], 99), ".0f"),
                         fmt(f["cpu_us"], ".0f"), " / ".join(f"{c:.2f}" for c in f["cores"])))
    print(f"\n## {args.streams} streams × {bp.MANY_TOKENS} tokens at {bp.MANY_RATE:g} tokens/s, alternating settings\n")
    print(describe_scheduling() + "\n")
    print(table(["round", "setting", "errors", "p99 added delay ms", "after the last first token", "before",
                 "TTFT p50 ms", "TTFT p99 ms", "gateway µs/token",
                 "cores: gateway / load generator / simulator"], rows))
    print()
    for setting, figures in runs.items():
        p99s = [percentile(f["added"], 99) for f in figures]
        ttft99 = [percentile(f["ttfts"], 99) for f in figures]
        print(f"- {setting}: p99 added delay {' / '.join(fmt(p, '.1f') for p in p99s)} ms (mean "
              f"{statistics.fmean(p99s):.1f}); TTFT p99 {' / '.join(fmt(t, '.0f') for t in ttft99)} ms; errors "
              f"{sum(f['errors'] for f in figures)}")


if __name__ == "__main__":
    main()
