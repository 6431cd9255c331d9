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


async def held_per_object(kind, count) -> float:
    """Bytes held a piece by `count` objects that `kind.make()` builds (leaving whatever of one waits started), by
    tracemalloc around them all; `kind.release(held)` lets each go afterwards."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = [await kind.make() for _ in range(count)]
    for _ in range(3):
        await asyncio.sleep(0)  # every task created has started and waits
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for one in held:
        await kind.release(one)
    return size / count


class Watchdogs:
    def __init__(self, module):
        self.module, self.handler = module, asyncio.current_task()

    async def make(self):
        relay = types.SimpleNamespace(request_id="req_memory", yield_started=None, started=0.0, figures=None)
        # An async heartbeat: what both contracts accept (the old one awaited it every tick, the new one awaits
        # what it returns). Nothing is due within the measurement: every watchdog's first tick is a second away.
        dog = self.module.Watchdog(relay, heartbeat=_nothing, on_stall=_nothing, settings=SETTINGS)
        dog.start(self.handler)
        return dog

    @staticmethod
    async def release(dog):
        dog.stop()


class Buffers:
    """A prefetch buffer while its response waits for the stream's end (the pump writes the tokens itself then: the
    buffer carries only the end), the waiting take()'s task included."""

    def __init__(self, module):
        self.module = module

    async def make(self):
        buffer = self.module.PrefetchBuffer(self.module.StreamFigures())
        return buffer, asyncio.ensure_future(buffer.take())

    @staticmethod
    async def release(held):
        buffer, waiting = held
        buffer.end()
        await waiting


class Queues:
    """An application queue once its request's body was taken and one `get()` waits (for a disconnect that does not
    come while the stream runs), the waiting task included."""

    def __init__(self, cls):
        self.cls = cls

    async def make(self):
        queue = self.cls()
        queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        await queue.get()
        return queue, asyncio.ensure_future(queue.get())

    @staticmethod
    async def release(held):
        _, waiting = held
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


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

    async def run(kind):
        return await held_per_object(kind(), args.count)

    per = asyncio.run(run(lambda: Watchdogs(_load(args.checkout, "watchdog"))))
    print(f"watchdog ({args.checkout}): {per:,.0f} bytes a stream ({args.count:,} started; the Watchdog object "
          "included)")
    per = asyncio.run(run(lambda: Buffers(_load(args.checkout, "buffer"))))
    print(f"prefetch buffer ({args.checkout}), its response waiting for the end: {per:,.0f} bytes a stream (the "
          "waiting task included)")
    from streaming.server.backpressure import Mailbox

    for name, cls in (("asyncio.Queue (Daphne's)", asyncio.Queue), ("Mailbox (Sluice's)", Mailbox)):
        per = asyncio.run(run(lambda: Queues(cls)))
        print(f"application queue, {name}: {per:,.0f} bytes a request (the waiting get's task included)")


if __name__ == "__main__":
    main()
