"""The memory a stream's watchdog holds: tracemalloc over 1,000 watchdogs started on one event loop.

    python -m bench.watchdog_memory [--checkout PATH] [--watchdogs 1000]

Loads `streaming/streams/watchdog.py` from `--checkout` (default: this one; give a `git worktree` of an older commit
to compare) and starts `--watchdogs` of them on stand-in relays, as many streams' relays do: what `bench.stream_memory`
shows of it moves by ±1 KB a stream from run to run with everything else a stream holds, this does not. Session 13:
a task, its coroutine and its sleep's timer per stream (086b3d4) against one ticker for all (docs/performance.md).
"""

import argparse
import asyncio
import gc
import importlib.util
import tracemalloc
import types
from pathlib import Path

SETTINGS = types.SimpleNamespace(STREAM_STALL_TIMEOUT=30.0, QUOTA_SLOT_TTL=30.0, UPSTREAM_IDLE_TIMEOUT=60.0,
                                 UPSTREAM_FIRST_TOKEN_TIMEOUT=60.0, STREAM_MAX_DURATION=600.0)


async def _nothing():
    return None


async def measure(module, count) -> float:
    relays = [types.SimpleNamespace(request_id=f"req_{i}", yield_started=None, started=0.0, figures=None)
              for i in range(count)]
    handler = asyncio.current_task()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    # An async heartbeat: what both contracts accept (the old one awaited it every tick, the new one awaits what it
    # returns). Nothing is due within the measurement: every watchdog's first tick is a second away.
    dogs = [module.Watchdog(relay, heartbeat=_nothing, on_stall=_nothing, settings=SETTINGS) for relay in relays]
    for dog in dogs:
        dog.start(handler)
    for _ in range(3):
        await asyncio.sleep(0)  # every task created has started and waits on its sleep
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for dog in dogs:
        dog.stop()
    return held / count


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.watchdog_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--watchdogs", type=int, default=1000)
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("watchdog_under_test",
                                                  Path(args.checkout) / "streaming" / "streams" / "watchdog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    per = asyncio.run(measure(module, args.watchdogs))
    print(f"{args.checkout}: {per:,.0f} bytes a watchdog ({args.watchdogs:,} started; the Watchdog object included)")


if __name__ == "__main__":
    main()
