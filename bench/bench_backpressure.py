"""Backpressure: slow readers on three servers side by side, then up to 1,000 paced streams on one gateway process.

1. Slow readers. 30 clients (SO_RCVBUF 4096 set before connect, 256 B read every 100 ms) each ask for a
   2,000-token stream from an upstream that streams at full speed, with `token_padding` making each stream
   tens of MB (far more than loopback's autotuned socket buffers on both hops). The same gateway app is served by
   `python -m streaming.server` (Daphne + backpressure), stock `python -m daphne` and `python -m uvicorn`. Over
   SAMPLE_SECONDS it prints the gateway's RSS (a time series) and what the simulator's /stats says about the
   upstream: bytes produced for these 30 requests, whether that still grows, and how many of its writes are
   blocked right now (the upstream paused by backpressure).
2. Many streams. 100, 250, 500 and 1,000 concurrent streams of 200 tokens at 20 tokens/s (10 s each) through one
   `streaming.server` process: errors, TTFT, the inter-token gaps seen by the clients minus the upstream's 50 ms,
   the gateway's CPU per token and memory per stream ((peak RSS − idle RSS) / streams), and the largest count that
   meets the delay target.

Only the slow readers, on the servers named (default: streaming.server alone, about 40 s):
`python -m bench.bench_backpressure [serve] [daphne] [uvicorn]`.
"""

import asyncio
import os
import time

import uvloop

from .common import (
    SERVER_LABELS, ProcessMonitor, SlowReader, bench_database, chat_body, fmt, gateway, gateway_env, log_exceptions,
    mb, percentile, raise_nofile, say, simulator, stream_chat, summarize_errors, table, verdict,
)

PATH = "/v1/chat/completions"
READERS = 30
READER_TOKENS = 2000
# Characters per token: a 2,000-token stream is ~32 MB. One stream alone had the upstream produce ~13 MB before
# its write blocked (the gateway's receive buffer on the upstream hop autotunes up to tcp_rmem's 32 MB max).
PADDING = 16000
SAMPLE_AT = (0, 5, 10, 20, 30)
TARGET_GROWTH_MB = 10

MANY = 1000  # issue 20, item 2: 1,000 paced streams in one process
# 100 streams first (the same pacing well below the process's capacity), then more: the report names the largest
# count that still meets the delay target.
MANY_LEVELS = (100, 250, 500, MANY)
TARGET_MEMORY_PER_STREAM_KB = 50
MANY_TOKENS = 200
MANY_RATE = 20.0
MANY_RAMP_SECONDS = 2.0  # the requests are sent evenly over this long
MANY_DEADLINE = 60.0
TARGET_ADDED_DELAY_MS = 50


def upstream_view(stats, request_ids):
    records = [r for r in stats["requests"] if r["client_request_id"] in request_ids]
    return {
        "requests": len(records),
        "bytes": sum(r["bytes_sent"] for r in records),
        "tokens": sum(r["tokens_sent"] for r in records),
        "blocked_now": sum(bool(r.get("blocked_now")) for r in records),
        "finished": sum(bool(r["finished"]) for r in records),
        "disconnected": sum(bool(r["disconnected"]) for r in records),
    }


async def slow_readers(sim, port, api_key, monitor):
    body = chat_body(READER_TOKENS)
    readers = [SlowReader(port, PATH, body, api_key) for _ in range(READERS)]
    started = time.monotonic()
    tasks = [asyncio.create_task(reader.run()) for reader in readers]
    series = []
    try:
        for at in SAMPLE_AT:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            ids = {r.request_id for r in readers if r.request_id}
            stats = await asyncio.to_thread(sim.stats)
            series.append((at, monitor.rss(), upstream_view(stats, ids),
                           sum(not r.closed_by_server for r in readers), sum(r.bytes_read for r in readers)))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return readers, series


def warmed(gw, db, label):
    """(a monitor of the gateway, its RSS) after one small request and a second to settle."""
    monitor = ProcessMonitor(gw.process.pid)
    warm = asyncio.run(stream_chat(gw.port, PATH, chat_body(3), db.api_key))
    if not warm.ok:
        raise RuntimeError(f"{label}: warm-up failed: {warm.error}\n{gw.stderr_text()[-3000:]}")
    time.sleep(1.0)
    return monitor, monitor.rss()


def run_slow_readers(db, sim, kinds=("serve", "daphne", "uvicorn")):
    results = {}
    for kind in kinds:
        sim.reset(token_padding=PADDING)
        say(f"backpressure bench: {READERS} slow readers on {SERVER_LABELS[kind]} ({max(SAMPLE_AT)} s)")
        with gateway(kind, gateway_env(db, sim.port)) as gw:
            monitor, idle = warmed(gw, db, kind)
            with monitor:
                readers, series = asyncio.run(slow_readers(sim, gw.port, db.api_key, monitor))
            results[kind] = {"idle": idle, "peak": monitor.peak, "series": series, "readers": readers,
                             "exceptions": log_exceptions(gw.stderr_text(), f"backpressure-{kind}-stderr")}
    sim.reset()
    return results


def report_slow_readers(results):
    per_stream_mb = READER_TOKENS * (PADDING + 120) / 1e6
    print(f"\n## Backpressure: {READERS} slow readers (SO_RCVBUF 4096, 256 B every 100 ms) on {READER_TOKENS}-token "
          f"streams of ~{per_stream_mb:.0f} MB each, upstream at full speed\n")
    rows = []
    for kind, r in results.items():
        series = r["series"]
        rss = " / ".join(f"{mb(s[1] - r['idle']):+.1f}" for s in series)
        last, before = series[-1][2], series[-2][2]
        rows.append((
            SERVER_LABELS[kind], f"{mb(r['idle']):.1f}", rss, f"{mb(r['peak'] - r['idle']):+.1f}",
            f"{mb(last['bytes']):,.0f}", f"{mb(last['bytes'] - before['bytes']):+.1f}",
            f"{last['blocked_now']}/{last['requests']}", last["finished"], f"{series[-1][3]}/{READERS}",
            f"{series[-1][4] / 1e6:.2f}"))
    times = "/".join(str(s[0]) for s in next(iter(results.values()))["series"])
    print(table(["server", "idle RSS MB", f"RSS growth MB at t={times} s", "peak growth MB",
                 f"upstream MB produced at {SAMPLE_AT[-1]} s", f"upstream MB in last {SAMPLE_AT[-1] - SAMPLE_AT[-2]} s",
                 "upstream writes blocked now", "upstream streams finished", "readers still connected",
                 "MB read by clients"], rows))
    for kind, r in results.items():
        closed = [x for x in r["readers"] if x.closed_by_server]
        if closed or r["exceptions"]:
            print(f"- {SERVER_LABELS[kind]}: {len(closed)} readers closed by the server"
                  + (f" ({closed[0].error or 'EOF'})" if closed else "")
                  + (f"; log: {r['exceptions']}" if r["exceptions"] else ""))
    serve, stock = results.get("serve"), results.get("daphne")
    print("\nTargets:")
    if serve:
        growth = mb(serve["peak"] - serve["idle"])
        last, before = serve["series"][-1][2], serve["series"][-2][2]
        paused = last["bytes"] == before["bytes"] and last["blocked_now"] == last["requests"] == READERS
        print(f"- streaming.server: ≤ {TARGET_GROWTH_MB} MB RSS growth for {READERS} slow readers: {growth:+.1f} MB → "
              f"{verdict(growth <= TARGET_GROWTH_MB)}; upstream paused (no bytes in the last "
              f"{SAMPLE_AT[-1] - SAMPLE_AT[-2]} s, {last['blocked_now']}/{READERS} writes blocked) → {verdict(paused)}")
    if serve and stock:
        print(f"- stock Daphne grows: {mb(stock['peak'] - stock['idle']):+.1f} MB → "
              f"{'as expected' if stock['peak'] - stock['idle'] > serve['peak'] - serve['idle'] + 50e6 else 'NOT as expected'}")


async def many_streams(port, api_key, count):
    body = chat_body(MANY_TOKENS)

    async def one(i):
        await asyncio.sleep(MANY_RAMP_SECONDS * i / count)
        return await stream_chat(port, PATH, body, api_key, record_times=True)

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=MANY_DEADLINE)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [t.result() for t in tasks if t in done]


def load(streams):
    """Run the load generator's streams on uvloop's loop: it shares the two cores with the gateway and the simulator,
    and on asyncio's it took ~0.45 of a core for 1,000 streams at 20 tokens/s (~22 µs a token), CPU the gateway then
    waited for (docs/performance.md, "Session 16"). The direct baseline runs on the same loop. BENCH_LOAD_LOOP=asyncio
    runs it on asyncio's, as before (an A/B switch: `python -m bench.many_ab BENCH_LOAD_LOOP=asyncio -`)."""
    if os.environ.get("BENCH_LOAD_LOOP", "").strip().lower() == "asyncio":
        return asyncio.run(streams)
    return asyncio.run(streams, loop_factory=uvloop.new_event_loop)


def run_many_direct(count):
    """The same streams straight to the simulator, with the same client: the delays the load generator and the
    simulator add by themselves on the same cores, which the gateway's figure contains too."""
    say(f"backpressure bench: {count} streams × {MANY_TOKENS} tokens at {MANY_RATE:g} tokens/s, direct to the simulator")
    with simulator(tokens_per_second=MANY_RATE) as sim:
        load(many_streams(sim.port, None, 10))  # its first connections
        started = time.perf_counter()
        results = load(many_streams(sim.port, None, count))
        wall = time.perf_counter() - started
    return {"count": count, "results": results, "idle": 0, "peak": 0, "cpu": 0, "wall": wall, "exceptions": []}


def run_many(db, count):
    say(f"backpressure bench: {count} streams × {MANY_TOKENS} tokens at {MANY_RATE:g} tokens/s on one gateway")
    with simulator(tokens_per_second=MANY_RATE) as sim:
        with gateway("serve", gateway_env(db, sim.port)) as gw:
            monitor, idle = warmed(gw, db, "serve")
            # The bench's own processes share the cores: the load generator (this process) and the simulator.
            others = [ProcessMonitor(os.getpid()), ProcessMonitor(sim.server.process.pid)]
            cpu, others_cpu = monitor.cpu(), [m.cpu() for m in others]
            started = time.perf_counter()
            with monitor:
                results = load(many_streams(gw.port, db.api_key, count))
            wall = time.perf_counter() - started
            cpu = monitor.cpu() - cpu
            others_cpu = [m.cpu() - before for m, before in zip(others, others_cpu)]
            exceptions = log_exceptions(gw.stderr_text(), f"backpressure-{count}-stderr")
    return {"count": count, "results": results, "idle": idle, "peak": monitor.peak, "cpu": cpu, "wall": wall,
            "exceptions": exceptions, "load_generator_cpu": others_cpu[0], "simulator_cpu": others_cpu[1]}


def many_row(m):
    results, count = m["results"], m["count"]
    ok = [r for r in results if r.ok and r.tokens == MANY_TOKENS]
    interval = 1.0 / MANY_RATE
    added, durations, settled, admitting = [], [], [], []
    # Once every stream had its first token, no admission competes with the relaying any more.
    admitted_by = max((r.first_token_at for r in ok), default=0)
    for r in ok:
        times = r.token_times
        gaps = [((b - a - interval) * 1000, b) for a, b in zip(times, times[1:])]
        added.extend(gap for gap, _ in gaps)
        for gap, at in gaps:
            (settled if at > admitted_by else admitting).append(gap)
        durations.append(times[-1] - times[0])
    ttfts = [r.ttft * 1000 for r in ok]
    tokens = sum(r.tokens for r in results)
    # Streams in flight at once: the most [first token, end] intervals overlapping.
    events = sorted([(r.first_token_at, 1) for r in ok] + [(r.ended_at, -1) for r in ok])
    level = peak_level = 0
    for _, step in events:
        level += step
        peak_level = max(peak_level, level)
    cpu_us = m["cpu"] / tokens * 1e6 if tokens else None
    return {
        "count": count, "errors": count - len(ok), "peak_level": peak_level, "ttfts": ttfts, "added": added,
        "added_after_admissions": settled, "added_during_admissions": admitting,
        "durations": durations, "tokens_per_s": tokens / m["wall"], "cpu_us": cpu_us,
        "cores_needed": cpu_us * count * MANY_RATE / 1e6 if cpu_us else None,
        "error_kinds": summarize_errors(results), "unfinished": count - len(results),
    }


def report_many(runs, direct=None):
    expected = (MANY_TOKENS - 1) / MANY_RATE
    print(f"\n## Many streams × {MANY_TOKENS} tokens at {MANY_RATE:g} tokens/s (10 s each) through one streaming.server "
          f"process, requests sent over {MANY_RAMP_SECONDS:g} s\n")
    rows, figures = [], []
    for m in runs:
        f = many_row(m)
        figures.append(f)
        added = f["added"]
        rows.append((
            f["count"], f["errors"], f["peak_level"], fmt(percentile(f["ttfts"], 50), ".0f"),
            fmt(percentile(f["ttfts"], 99), ".0f"), fmt(percentile(added, 50), ".1f"),
            fmt(percentile(added, 99), ".1f"), fmt(max(added, default=None), ".0f"),
            f"{fmt(percentile(f['durations'], 50), '.2f')} ({expected:.2f})", f"{f['tokens_per_s']:,.0f}",
            fmt(f["cpu_us"], ".0f"), fmt(f["cores_needed"], ".2f"), f"{mb(m['idle']):.1f}", f"{mb(m['peak']):.1f}",
            f"{(m['peak'] - m['idle']) / f['count'] / 1e3:.0f}"))
    print(table(
        ["streams", "errors", "in flight (peak)", "TTFT p50 ms", "TTFT p99 ms", "added inter-token delay p50 ms",
         "p99 ms", "max ms", "stream duration p50 s (paced)", "tokens/s", "gateway CPU µs/token",
         "cores needed at that µs/token", "idle RSS MB", "peak RSS MB", "memory per stream KB"], rows))
    for m, f in zip(runs, figures):
        if f["errors"]:
            print(f"\n{f['count']} streams, errors: {f['error_kinds']}"
                  + (f"; {f['unfinished']} not finished within {MANY_DEADLINE:g} s" if f["unfinished"] else ""))
        if m["exceptions"]:
            print(f"{f['count']} streams, gateway log: {m['exceptions']}")
    f, m = figures[-1], runs[-1]
    p99 = percentile(f["added"], 99)
    per_stream_kb = (m["peak"] - m["idle"]) / f["count"] / 1e3
    print(f"\nTargets ({f['count']} streams):")
    print(f"- no errors: {f['errors']} → {verdict(f['errors'] == 0)}")
    print(f"- p99 added inter-token delay ≤ {TARGET_ADDED_DELAY_MS} ms: {fmt(p99, '.1f')} ms → "
          f"{verdict(p99 is not None and p99 <= TARGET_ADDED_DELAY_MS)}")
    settled = f["added_after_admissions"]
    print(f"  (a diagnostic: {fmt(percentile(settled, 99), '.1f')} ms over the {len(settled):,} gaps after the last "
          f"stream's first token, when no admission competes with the relaying; "
          f"{fmt(percentile(f['added_during_admissions'], 99), '.1f')} ms before)")
    if direct is not None:
        d = many_row(direct)
        print(f"  (the baseline: the same {d['count']:,} streams direct to the simulator, same client, no gateway: "
              f"{d['errors']} errors, p99 added delay {fmt(percentile(d['added'], 99), '.1f')} ms, p50 "
              f"{fmt(percentile(d['added'], 50), '.1f')} ms, TTFT p50 {fmt(percentile(d['ttfts'], 50), '.0f')} ms: "
              f"what the load generator and the simulator add by themselves on these cores)")
    print(f"- memory per stream ≤ {TARGET_MEMORY_PER_STREAM_KB} KB: {per_stream_kb:.0f} KB → "
          f"{verdict(per_stream_kb <= TARGET_MEMORY_PER_STREAM_KB)}")
    print(f"- CPU needed at {f['count']} streams: {fmt(f['cores_needed'], '.2f')} cores at "
          f"{fmt(f['cpu_us'], '.0f')} µs/token")
    last = runs[-1]
    if last.get("load_generator_cpu") is not None:
        print(f"  (the bench's own processes meanwhile, on the same {os.cpu_count()} cores: the load generator "
              f"{last['load_generator_cpu'] / last['wall']:.2f} cores, the simulator "
              f"{last['simulator_cpu'] / last['wall']:.2f}, the gateway {last['cpu'] / last['wall']:.2f}, averaged over "
              f"the level)")
    meeting = [g["count"] for g in figures if not g["errors"] and (q := percentile(g["added"], 99)) is not None
               and q <= TARGET_ADDED_DELAY_MS]
    print(f"- the largest count measured that meets the delay target with no errors: "
          f"{max(meeting) if meeting else 'none'} (of {', '.join(str(g['count']) for g in figures)})")


def run():
    raise_nofile()
    with bench_database() as db:
        with simulator() as sim:
            slow = run_slow_readers(db, sim)
        report_slow_readers(slow)
    report_many([run_many_fresh(count) for count in MANY_LEVELS], run_many_direct(MANY))


def run_many_fresh(count):
    """`run_many` on a database of its own: each level has its own simulator, and a database's catalogue keeps the
    provider URL its first gateway wrote (the catalogue's bootstrap: streaming/catalogue/registry.py)."""
    with bench_database() as db:
        return run_many(db, count)


def run_slow_readers_only(kinds=("serve",)):
    raise_nofile()
    with bench_database() as db:
        with simulator() as sim:
            results = run_slow_readers(db, sim, kinds)
        report_slow_readers(results)


if __name__ == "__main__":
    import sys

    chosen = tuple(sys.argv[1:]) or ("serve",)
    unknown = [kind for kind in chosen if kind not in SERVER_LABELS]
    if unknown:
        sys.exit(f"unknown server {', '.join(unknown)}: choose from {', '.join(SERVER_LABELS)}")
    run_slow_readers_only(chosen)
