"""Where a stream's memory goes: the Python allocations one paced stream holds in the gateway, by package.

    python -m bench.stream_memory [--streams 200] [--top 15] [--prompt-bytes 0]

Starts a gateway with tracemalloc on (a `sitecustomize` module in a temporary directory on its PYTHONPATH, which
dumps a snapshot on SIGUSR1), takes a snapshot when it is idle after a warm-up and one with `--streams` paced
streams in flight (20 tokens/s, 400-token answers: all of them open at the second snapshot), and prints the
difference per stream: by package, then the lines that allocated most. `--prompt-bytes N` sends a user message of N
bytes (a conversation's size) instead of a two-word one: what a request's body costs while its answer streams. tracemalloc slows the gateway several
times over, so these are the allocations, not the benchmark's RSS per stream (`./dev bench backpressure`).
"""

import argparse
import asyncio
import collections
import linecache
import os
import signal
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from . import bench_gateway
from .common import bench_database, chat_body, closed_loop, gateway, gateway_env, raise_nofile, say, simulator, \
    stream_chat
from .servers import PROJECT_ROOT

SITECUSTOMIZE = """
import os, signal, tracemalloc

tracemalloc.start()


def _dump(signum, frame):
    import gc
    gc.collect()
    count = getattr(_dump, "count", 0)
    _dump.count = count + 1
    tracemalloc.take_snapshot().dump(os.path.join(os.environ["SLUICE_SNAPSHOT_DIR"], f"snapshot{count}"))


signal.signal(signal.SIGUSR1, _dump)
"""
RATE = 20
TOKENS = 400


def snapshot(pid, directory: Path, number: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = directory / f"snapshot{number}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists():
            size = path.stat().st_size
            time.sleep(0.5)  # still being written?
            if path.stat().st_size == size:
                return tracemalloc.Snapshot.load(str(path))
        time.sleep(0.2)
    raise RuntimeError("the gateway wrote no snapshot")


def prompt(size: int) -> dict:
    """A conversation of about `size` bytes of text (words, as a tokenizer meets them), or the bench's default."""
    if not size:
        return {}
    words = ("the quick brown fox jumps over a lazy dog while " * (size // 48 + 1))[:size]
    return {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": words}]}


def package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith(str(PROJECT_ROOT)):
        return "sluice: " + os.path.relpath(filename, PROJECT_ROOT)
    return "stdlib: " + os.path.basename(filename)


def report(idle, busy, streams, top, prompt_bytes=0):
    stats = busy.compare_to(idle, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"\n## Python allocations per paced stream: {total / streams / 1024:.1f} KB ({streams} streams in flight"
          f"{f', {prompt_bytes:,}-byte prompts' if prompt_bytes else ''})\n")
    by_package = collections.Counter()
    for stat in stats:
        by_package[package(stat.traceback[0].filename)] += stat.size_diff
    print("| package | bytes a stream |\n|---|---:|")
    for name, size in by_package.most_common(top):
        print(f"| {name} | {size / streams:,.0f} |")
    print("\n| line | bytes a stream | objects a stream |\n|---|---:|---:|")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()[:70]
        print(f"| {package(frame.filename)}:{frame.lineno} `{code}` | {stat.size_diff / streams:,.0f} | "
              f"{stat.count_diff / streams:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.stream_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--prompt-bytes", type=int, default=0, help="a user message of this many bytes (default: two words)")
    args = parser.parse_args(argv)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="sluice-memory-") as tmp, bench_database() as db, simulator() as sim:
        directory = Path(tmp)
        (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = gateway_env(db, sim.port, PYTHONPATH=tmp, SLUICE_SNAPSHOT_DIR=tmp)
        with gateway("serve", env) as gw:
            bench_gateway.run_level(gw.port, db.api_key, 4, 40, 20)
            idle = snapshot(gw.process.pid, directory, 0)
            sim.control(tokens_per_second=RATE)
            body = chat_body(TOKENS, **prompt(args.prompt_bytes))
            say(f"stream memory: {args.streams} streams at {RATE} tokens/s")
            load = threading.Thread(target=lambda: asyncio.run(closed_loop(
                args.streams, args.streams, lambda: stream_chat(gw.port, bench_gateway.PATH, body, db.api_key))))
            load.start()
            time.sleep(TOKENS / RATE / 2)  # every stream open, none finished
            busy = snapshot(gw.process.pid, directory, 1)
            load.join()
            sim.control(tokens_per_second=0)
    report(idle, busy, args.streams, args.top, args.prompt_bytes)


if __name__ == "__main__":
    main()
