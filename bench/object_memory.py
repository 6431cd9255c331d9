"""The memory some of a stream's objects hold, by tracemalloc over 1,000 of them on one event loop: its watchdog, its
prefetch buffer, and the application queue its request's messages pass through.

    python -m bench.object_memory [--checkout PATH] [--count 1000]

What `bench.stream_memory` shows of either moves by ±1 KB a stream from run to run with everything else a stream
holds; these do not. The watchdog and the buffer: `streaming/streams/watchdog.py` and `buffer.py` loaded from
`--checkout` (default: this one; give a `git worktree` of an older commit to compare), `--count` of each, the
watchdogs started on stand-in relays, each buffer with its response's take() waiting. Session 13: a task, its
coroutine and its sleep's timer a stream (086b3d4) against one ticker for all. The application queue, as a streaming
request leaves it (its body message taken, Django's disconnect listener waiting): Daphne's asyncio.Queue against
Sluice's Mailbox (streaming/server/backpressure.py). docs/performance.md, "Session 13".
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


async def buffers(module, count) -> float:
    """Bytes a prefetch buffer holds while its response waits for the stream's end (the pump writes the tokens
    itself then: the buffer carries only the end), the waiting take()'s task included."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = []
    for _ in range(count):
        buffer = module.PrefetchBuffer(module.StreamFigures())
        held.append((buffer, asyncio.ensure_future(buffer.take())))
    for _ in range(3):
        await asyncio.sleep(0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for buffer, _ in held:
        buffer.end()
    await asyncio.gather(*(waiting for _, waiting in held))
    return size / count


async def queues(make, count) -> float:
    """Bytes an application queue holds once its request's body was taken and one `get()` waits (for a disconnect
    that does not come while the stream runs)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = []
    for _ in range(count):
        queue = make()
        queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        await queue.get()
        held.append((queue, asyncio.ensure_future(queue.get())))
    for _ in range(3):
        await asyncio.sleep(0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for _, waiting in held:
        waiting.cancel()
    await asyncio.gather(*(waiting for _, waiting in held), return_exceptions=True)
    return size / count


def _load(checkout, name):
    """streaming/streams/<name>.py of `checkout`, as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                  Path(checkout) / "streaming" / "streams" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.object_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    args.watchdogs = args.count
    module = _load(args.checkout, "watchdog")
    per = asyncio.run(measure(module, args.watchdogs))
    print(f"watchdog ({args.checkout}): {per:,.0f} bytes a stream ({args.count:,} started; the Watchdog object "
          "included)")
    per = asyncio.run(buffers(_load(args.checkout, "buffer"), args.count))
    print(f"prefetch buffer ({args.checkout}), its response waiting for the end: {per:,.0f} bytes a stream (the "
          "waiting task included)")
    from streaming.server.backpressure import Mailbox

    for name, make in (("asyncio.Queue (Daphne's)", asyncio.Queue), ("Mailbox (Sluice's)", Mailbox)):
        per = asyncio.run(queues(make, args.count))
        print(f"application queue, {name}: {per:,.0f} bytes a request (the waiting get's task included)")


if __name__ == "__main__":
    main()
