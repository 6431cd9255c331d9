"""`python -m bench [gateway|backpressure|quotas|resilience|chaos|fairness|fleet ...] [--profile] [--minutes N]`: run
the benchmarks.

With no scenario named, the first four run in turn (about six minutes on a 2-core machine); `chaos` (the chaos
soak, ~4 minutes), `fairness` (~2 minutes) and `fleet` (~1 minute, needs PostgreSQL) run only when named. See
bench/README.md.
"""

import argparse
import datetime
import platform
import sys
import time

import psutil

from . import bench_backpressure, bench_chaos, bench_fairness, bench_gateway, bench_quotas, bench_resilience, fleet
from .common import RESULTS_DIR, describe_interpreter, describe_scheduling, raise_nofile, shorten_time_slice

SCENARIOS = {"gateway": bench_gateway, "backpressure": bench_backpressure, "quotas": bench_quotas,
             "resilience": bench_resilience, "chaos": bench_chaos, "fairness": bench_fairness, "fleet": fleet}
# What runs when no scenario is named: not the chaos soak (it asserts rather than measures, and needs PostgreSQL).
DEFAULT_SCENARIOS = ["gateway", "backpressure", "quotas", "resilience"]


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"one or more of {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)})")
    parser.add_argument("--profile", action="store_true",
                        help="gateway: also profile the gateway with py-spy (pip install py-spy) and list the top costs")
    parser.add_argument("--minutes", type=float, default=3.0, help="chaos: minutes of load (default 3)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    names = args.scenarios or DEFAULT_SCENARIOS
    # Everything printed also goes to bench/results/last-run.md (git-ignored).
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, open(RESULTS_DIR / "last-run.md", "w"))
    soft, hard = raise_nofile()
    shorten_time_slice()

    print(f"# Sluice benchmarks, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"Python {platform.python_version()} ({describe_interpreter()}) on {platform.system()} "
          f"{platform.release()}, "
          f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
          f"RLIMIT_NOFILE {soft}/{hard} (inherited by the servers started here).")
    print(describe_scheduling())
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        module = SCENARIOS[name]
        if name == "gateway":
            module.run(profile=args.profile)
        elif name == "chaos":
            module.run(minutes=args.minutes)  # raises SystemExit(1) after its report when an assertion fails
        else:
            module.run()
        print(f"\n({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\nTotal: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
