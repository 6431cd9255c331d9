"""Where a gateway process's idle RSS comes from: the resident memory each step of its start-up adds, in one fresh
interpreter, in the order below (each step's figure is what it adds to the ones before).

    python -m bench.import_memory [--rounds 3] [--levers]

The steps: the interpreter alone; `import openai` (the provider client the product is built on: it imports its HTTP
stack, aiohttp among it, and pydantic's types of the whole API); the o200k_base tokenizer (`quotas.domain.tokens`:
tiktoken's Rust core with the 200k-token vocabulary, what the meter counts with); Django's set-up with Sluice's
settings and apps; and the ASGI application with everything the server imports (`config.asgi`, the server's
modules). The gateway bench's "idle RSS" is the whole of it plus the server's start. Each round is a new process;
the table gives each step's median. docs/performance.md, "Session 17".

`--levers` adds what the levers within reach would take off (docs/performance.md, "Session 18"): `import openai`
with aiohttp unimportable (as if it were not installed: the SDK imports its vendored aiohttp transport whenever it
is), the whole start-up under `python -OO` (no docstrings), and glibc's `malloc_trim(0)` after it.
"""

import argparse
import json
import os
import statistics
import subprocess

from .common import PY, secret_key
from .servers import PROJECT_ROOT

STEPS = [
    ("the interpreter", ""),
    ("import openai (the SDK and its HTTP stack)", "import openai"),
    ("the o200k_base tokenizer (tiktoken)", "from quotas.domain import tokens"),
    ("django.setup() (Sluice's settings and apps)", "import django; django.setup()"),
    ("the ASGI application and the server's modules", "import config.asgi, streaming.server.backpressure"),
]

SCRIPT = """
import gc, json, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
out = []
for code in json.loads(sys.argv[1]):
    exec(code, {})
    gc.collect()
    out.append((rss(), len(sys.modules)))
print(json.dumps(out))
"""

WHOLE = "; ".join(code for _, code in STEPS if code)
NO_AIOHTTP = "import sys; sys.modules['aiohttp'] = None"  # an import of it then fails, as if it were not installed
TRIM = "import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)"
# (name, interpreter options, steps): each lever against the figure it changes, in the same fresh-process way.
LEVERS = [
    ("`import openai`", [], ["import openai"]),
    ("`import openai`, aiohttp not importable", [], [NO_AIOHTTP, "import openai"]),
    ("the whole start-up", [], [WHOLE]),
    ("the whole start-up under `python -OO`", ["-OO"], [WHOLE]),
    ("the whole start-up, then `malloc_trim(0)`", [], [WHOLE, TRIM]),
    ("the whole start-up under `-OO`, then `malloc_trim(0)`", ["-OO"], [WHOLE, TRIM]),
]


def measure_once(steps=None, options=()):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DJANGO_SECRET_KEY": secret_key(),
           "DATABASE_URL": "sqlite:///:memory:", "REDIS_URL": "", "LOG_LEVEL": "WARNING"}
    steps = [code for _, code in STEPS] if steps is None else steps
    done = subprocess.run([PY, *options, "-c", SCRIPT, json.dumps(steps)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.import_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levers", action="store_true", help="also what each lever within reach takes off")
    args = parser.parse_args(argv)
    runs = [measure_once() for _ in range(args.rounds)]
    print(f"\n## Resident memory of a gateway's start-up, step by step (median of {args.rounds} fresh processes)\n")
    print("| step | adds MB | RSS after MB | modules after |")
    print("|---|---:|---:|---:|")
    previous = 0
    for index, (name, _) in enumerate(STEPS):
        rss = statistics.median(run[index][0] for run in runs)
        modules = statistics.median(run[index][1] for run in runs)
        added = "" if index == 0 else f"+{(rss - previous) / 2**20:.1f}"
        print(f"| {name} | {added} | {rss / 2**20:.1f} | {modules:.0f} |")
        previous = rss
    if args.levers:
        print_levers(args.rounds)


def print_levers(rounds):
    print(f"\n## The levers within reach (median of {rounds} fresh processes each)\n")
    print("| what | RSS MB | modules |")
    print("|---|---:|---:|")
    for name, options, steps in LEVERS:
        # The first run of -OO compiles the optimised bytecode files: a warm-up process, not counted.
        if options:
            measure_once(steps, options)
        runs = [measure_once(steps, options)[-1] for _ in range(rounds)]
        rss = statistics.median(run[0] for run in runs)
        modules = statistics.median(run[1] for run in runs)
        print(f"| {name} | {rss / 2**20:.1f} | {modules:.0f} |")


if __name__ == "__main__":
    main()
