"""Gateway overhead: the same streams direct to the simulated upstream and through the gateway.

The simulator runs alone under Uvicorn (full speed); the gateway is `python -m streaming.server` (Daphne with
backpressure) on a temporary SQLite database with the in-process counter store. At 1, 50 and 200 concurrent
streams of 200 tokens it prints TTFT p50/p99 (request sent → first content chunk read), aggregate tokens/s, the
gateway's CPU time per streamed token (psutil user+system of its pid over the run), its idle and peak RSS, and
the gateway-vs-direct ratios. With --profile, a py-spy pass at 50 streams lists where the gateway's CPU goes.
"""

import asyncio
import os
import subprocess
import time

import psutil

from .common import (
    HOST, PROJECT_ROOT, PY, ProcessMonitor, bench_database, secret_key, chat_body, closed_loop, fmt, gateway, gateway_env, mb, percentile,
    describe_scheduling, log_exceptions, print_profile, raise_nofile, run_queue_wait, say, simulator, start_profile,
    stream_chat, summarize_errors, table, verdict,
)
from . import relay_floor

TOKENS = 200
# (concurrent streams, streams in all, tokens per stream, upstream tokens/s; 0 = full speed): each level runs a
# few seconds on 2 cores.
# One stream: 300 requests in a row, for a p50 that holds from run to run (60 moved by ±0.5 ms).
LEVELS = [(1, 300, TOKENS, 0), (50, 250, TOKENS, 0), (200, 600, TOKENS, 0)]
# The same tokens as the 50-stream level in a fifth of the requests: CPU = per request × requests + per token × tokens.
LONG_LEVEL = (50, 50, 1000, 0)
# Paced like a model (one token per upstream event and per client write, no coalescing): 4 s streams.
PACED_LEVEL = (50, 100, TOKENS, 50)
# A diagnostic, not the target's measure: TTFT at one stream with 2-token answers, i.e. the same path to the first
# token without the rest of a 200-token burst (the simulator generating it, the gateway relaying it) keeping both
# cores busy while the first token is read (docs/performance.md, "TTFT at one stream").
SHORT_LEVEL = (1, 100, 2, 0)
WARMUP = 5
TARGET_CPU_US_PER_TOKEN = 65
TARGET_TTFT_ADDED_MS = 3
# Issue 20, item 1: a paced token (one per upstream event and per client write), the per-request part included.
TARGET_PACED_US_PER_TOKEN = 40
TARGET_IDLE_RSS_MB = 120
# Routing (issue 17): one-stream TTFT for a model with three weighted deployments over two priorities, against one
# with a single deployment, in alternating rounds (the same gateway, the same simulator).
TARGET_ROUTING_ADDED_MS = 0.3
ROUTING_ROUNDS, ROUTING_PER_ROUND, ROUTING_TOKENS = 4, 100, 2
ROUTED_SCRIPT = r"""
import sys
import django
django.setup()
from decimal import Decimal
from django.utils import timezone
from quotas.models import ApiKey, Plan, Team, TeamMembership, UserQuota
from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
provider = Provider.objects.create(name="bench-routed", base_url=sys.argv[1])
for model_name in ("sim-routed", "sim-priced"):
    model = ServedModel.objects.create(name=model_name)
    for name, weight, priority in (("sim-small", 3, 1), ("sim-small-b", 1, 1), ("sim-small-c", 1, 2)):
        Deployment.objects.create(model=model, provider=provider, upstream_model=name, weight=weight,
                                  priority=priority)
# Money on top of routing (issue 20, item 5): a priced model, the user's budgets, a team pool with a member's cap
# and a key's own spend limits: every money window a request can have, all far from their limits.
ModelPrice.objects.create(model=model, effective_from=timezone.now(), input=Decimal("1"), output=Decimal("4"))
user = UserQuota.objects.get().user
Plan.objects.filter(name="bench").update(budget_per_day=Decimal(10**6), budget_per_month=Decimal(10**7))
team = Team.objects.create(name="bench", budget_per_day=Decimal(10**6), budget_per_month=Decimal(10**7))
TeamMembership.objects.create(team=team, user=user, budget_per_day=Decimal(10**6), budget_per_month=Decimal(10**7))
key, raw = ApiKey.issue(user, name="bench team")
ApiKey.objects.filter(pk=key.pk).update(team=team, budget_per_day=Decimal(10**6), budget_per_month=Decimal(10**7))
print(raw)
"""
PATH = "/v1/chat/completions"


def run_level(port, api_key, concurrency, total, tokens=TOKENS):
    body = chat_body(tokens)
    return asyncio.run(closed_loop(concurrency, total, lambda: stream_chat(port, PATH, body, api_key)))


def measure(port, api_key, concurrency, total, per_stream, rate, gw_monitor, sim_monitor, me):
    gw_cpu, sim_cpu, my_cpu = gw_monitor.cpu(), sim_monitor.cpu(), me.cpu_times()
    gw_monitor.reset_peak()
    waited = run_queue_wait()
    results, wall = run_level(port, api_key, concurrency, total, per_stream)
    my_after = me.cpu_times()
    if waited is not None:
        waited = (run_queue_wait() - waited) / total
    tokens = sum(r.tokens for r in results)
    ttfts = [r.ttft * 1000 for r in results if r.ok and r.ttft is not None]
    return {
        "concurrency": concurrency, "streams": total, "per_stream": per_stream, "rate": rate, "wall": wall,
        "tokens": tokens,
        "gw_cpu": gw_monitor.cpu() - gw_cpu,
        "errors": sum(not r.ok for r in results), "error_kinds": summarize_errors(results),
        "short": sum(r.ok and r.tokens != per_stream for r in results),
        "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
        "tokens_per_s": tokens / wall,
        "gw_cpu_us": (gw_monitor.cpu() - gw_cpu) / tokens * 1e6 if tokens else None,
        "sim_cpu_us": (sim_monitor.cpu() - sim_cpu) / tokens * 1e6 if tokens else None,
        "client_cpu": ((my_after.user + my_after.system) - (my_cpu.user + my_cpu.system)) / wall * 100,
        "gw_peak_rss": gw_monitor.peak,
        "client_wait_ms": waited * 1000 if waited is not None else None,
    }


def run(profile=False):
    raise_nofile()
    me = psutil.Process()
    rows, profiles = [], []
    with bench_database() as db, simulator() as sim:
        sim_monitor = ProcessMonitor(sim.pid)
        with gateway("serve", gateway_env(db, sim.port)) as gw:
            gw_monitor = ProcessMonitor(gw.process.pid)
            time.sleep(1.0)
            idle_cold = gw_monitor.rss()
            warm = run_level(gw.port, db.api_key, 1, WARMUP)[0] + run_level(sim.port, None, 1, WARMUP)[0]
            if not all(r.ok for r in warm):
                raise RuntimeError(f"warm-up failed: {summarize_errors(warm)}\n{gw.stderr_text()[-3000:]}")
            time.sleep(1.0)
            idle_warm = gw_monitor.rss()
            with gw_monitor:
                for concurrency, total, per_stream, rate in [*LEVELS, LONG_LEVEL, PACED_LEVEL, SHORT_LEVEL]:
                    say(f"gateway bench: {concurrency} concurrent, {total} streams of {per_stream} tokens"
                        + (f" at {rate} tokens/s" if rate else ""))
                    sim.control(tokens_per_second=rate)
                    args = (concurrency, total, per_stream, rate, gw_monitor, sim_monitor, me)
                    rows.append((measure(sim.port, None, *args), measure(gw.port, db.api_key, *args)))
                if profile:
                    for concurrency, total, per_stream, rate in (LEVELS[0], PACED_LEVEL):
                        label = f"{concurrency} concurrent {per_stream}-token streams" + (
                            f" at {rate} tokens/s" if rate else " at full speed")
                        say(f"gateway bench: py-spy profile, {label}")
                        sim.control(tokens_per_second=rate)
                        out = profile_gateway(
                            gw.process.pid, f"gateway-profile-{concurrency}{'-paced' if rate else ''}",
                            lambda: run_level(gw.port, db.api_key, concurrency, min(total, concurrency), per_stream))
                        if out is not None:
                            profiles.append((label, out))
                sim.control(tokens_per_second=0)
            routing = measure_routing(gw, db, sim)
            stderr = gw.stderr_text()
            scheduling = describe_scheduling([gw.process.pid, sim.pid])
        pinned = measure_pinned(db, sim, sim_monitor, me)
    concurrency, _, per_stream, rate = PACED_LEVEL
    say("gateway bench: the floor, a minimal relay at the paced level's pacing (bench.relay_floor)")
    floor = relay_floor.measure(connections=concurrency, rate=rate, events=per_stream)
    report(rows, idle_cold, idle_warm, stderr, scheduling, floor, pinned)
    report_routing(*routing)
    for label, out in profiles:
        print_profile(out, f"py-spy profile of the gateway (GIL holder only), {label}")
    return rows


def measure_pinned(db, sim, sim_monitor, me):
    """(the CPU, the paced level's row) on a second gateway pinned to the last usable CPU (SLUICE_CPUS,
    streaming/server/affinity.py): a diagnostic next to the paced target's row, which is the default (not pinned)."""
    cpu = max(os.sched_getaffinity(0))
    concurrency, total, per_stream, rate = PACED_LEVEL
    say(f"gateway bench: {concurrency} concurrent, {total} streams of {per_stream} tokens at {rate} tokens/s, "
        f"the gateway pinned to CPU {cpu}")
    with gateway("serve", gateway_env(db, sim.port, SLUICE_CPUS=cpu)) as gw:
        monitor = ProcessMonitor(gw.process.pid)
        sim.control(tokens_per_second=0)
        run_level(gw.port, db.api_key, 1, WARMUP)
        sim.control(tokens_per_second=rate)
        run_level(gw.port, db.api_key, concurrency, concurrency, per_stream)  # warm, as the default's levels before
        with monitor:
            row = measure(gw.port, db.api_key, concurrency, total, per_stream, rate, monitor, sim_monitor, me)
        sim.control(tokens_per_second=0)
    return cpu, row


def measure_routing(gw, db, sim):
    """TTFT p50 (ms) at one stream: one deployment; three deployments routed; three routed at a priced model with
    every money window (the user's budgets, a team pool, a member's cap, a key's limits: the team key) — alternating
    rounds."""
    say("gateway bench: routing among three deployments vs one, and with budgets")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": db.url,
           "DJANGO_SECRET_KEY": secret_key()}
    made = subprocess.run([PY, "-c", ROUTED_SCRIPT, f"http://{HOST}:{sim.port}/v1"], cwd=PROJECT_ROOT, env=env,
                          check=True, capture_output=True, text=True)
    team_key = made.stdout.strip().splitlines()[-1]
    variants = ((chat_body(ROUTING_TOKENS), db.api_key), (chat_body(ROUTING_TOKENS, model="sim-routed"), db.api_key),
                (chat_body(ROUTING_TOKENS, model="sim-priced"), team_key))
    deadline = time.monotonic() + 30
    for body, key in variants[1:]:
        while not asyncio.run(stream_chat(gw.port, PATH, body, key)).ok:  # the gateway's catalogue refresh
            if time.monotonic() > deadline:
                raise RuntimeError(f"the routed models never answered:\n{gw.stderr_text()[-2000:]}")
            time.sleep(0.2)
    ttfts = [[], [], []]
    for _ in range(ROUTING_ROUNDS):
        for (body, key), measured in zip(variants, ttfts):
            results, _ = asyncio.run(closed_loop(1, ROUTING_PER_ROUND,
                                                 lambda body=body, key=key: stream_chat(gw.port, PATH, body, key)))
            if not all(r.ok for r in results):
                raise RuntimeError(f"routing bench: {summarize_errors(results)}")
            measured += [r.ttft * 1000 for r in results]
    return *(percentile(measured, 50) for measured in ttfts), len(ttfts[0])


def report_routing(one, three, priced, count):
    print(f"\n## Routing and budgets: one-stream TTFT, {ROUTING_TOKENS}-token answers, {count} requests each in "
          f"{ROUTING_ROUNDS} alternating rounds\n")
    print(table(["model", "TTFT p50 ms"], [
        ["one deployment", f"{one:.2f}"],
        ["three deployments, weights 3:1 + a fallback priority", f"{three:.2f}"],
        ["the same, priced, with the user's budgets, a team pool, a member's cap and a key's limits", f"{priced:.2f}"],
    ]))
    print(f"\n- routing adds ≤ {TARGET_ROUTING_ADDED_MS} ms p50 at one stream: {three - one:+.2f} ms → "
          f"{verdict(three - one <= TARGET_ROUTING_ADDED_MS)}")
    print(f"- routing and budgets together add ≤ {TARGET_ROUTING_ADDED_MS} ms: {priced - one:+.2f} ms → "
          f"{verdict(priced - one <= TARGET_ROUTING_ADDED_MS)}")


def profile_gateway(pid, name, load, seconds=8):
    started = start_profile(pid, seconds, name)
    if started is None:
        say("py-spy not found: pip install py-spy")
        return None
    spy, out = started
    time.sleep(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load()
    spy.wait(timeout=60)
    if spy.returncode:
        say(f"py-spy failed: {spy.stderr.read().decode()[-500:]}")
        return None
    return out


def report(rows, idle_cold, idle_warm, stderr, scheduling="", floor=None, pinned=None):
    print(f"\n## Gateway overhead: {TOKENS}-token streams at full speed, direct vs through the gateway\n")
    print(f"Gateway: `python -m streaming.server` (Daphne + backpressure), SQLite, in-process store; "
          f"idle RSS {mb(idle_cold):.1f} MB after start, {mb(idle_warm):.1f} MB after {WARMUP} warm-up requests. "
          f"{scheduling}\n")
    lines = []
    everything = rows
    rows, long_pair, paced_pair, short_pair = rows[:-3], rows[-3], rows[-2], rows[-1]
    for direct, through in everything:
        for name, r in (("direct", direct), ("gateway", through)):
            lines.append((
                r["concurrency"], name,
                f"{r['streams']} × {r['per_stream']}" + (f" @ {r['rate']}/s" if r["rate"] else ""), r["errors"], fmt(r["ttft_p50"], ".2f"), fmt(r["ttft_p99"], ".2f"),
                f"{r['tokens_per_s']:,.0f}", fmt(r["gw_cpu_us"], ".1f") if name == "gateway" else "-",
                fmt(r["sim_cpu_us"], ".1f"), f"{r['client_cpu']:.0f}",
                f"{mb(r['gw_peak_rss']):.1f}" if name == "gateway" else "-"))
        lines.append((
            direct["concurrency"], "gw/direct", "", "",
            f"{through['ttft_p50'] / direct['ttft_p50']:.1f}x (+{through['ttft_p50'] - direct['ttft_p50']:.2f})",
            f"{through['ttft_p99'] / direct['ttft_p99']:.1f}x (+{through['ttft_p99'] - direct['ttft_p99']:.2f})",
            f"{through['tokens_per_s'] / direct['tokens_per_s']:.2f}x", "", "", "", ""))
    print(table(["streams in flight", "path", "streams × tokens", "errors", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
                 "gateway CPU µs/token", "upstream CPU µs/token", "client CPU %", "gateway peak RSS MB"], lines))
    errors = [f"{r['concurrency']} × {r['per_stream']} {name}: {r['error_kinds']}" for pair in everything
              for name, r in zip(("direct", "gateway"), pair) if r["errors"]]
    short = sum(r["short"] for pair in everything for r in pair)
    if errors:
        print("\nErrors: " + " | ".join(errors))
    if short:
        print(f"\n{short} completed streams had a token count other than asked for.")
    # CPU = a × requests + b × tokens, from the two 50-stream levels (same tokens, a fifth of the requests).
    short_run, long_run = rows[1][1], long_pair[1]
    per_request = (short_run["gw_cpu"] - long_run["gw_cpu"] * short_run["tokens"] / long_run["tokens"]) / (
        short_run["streams"] - long_run["streams"] * short_run["tokens"] / long_run["tokens"])
    per_token = (long_run["gw_cpu"] - per_request * long_run["streams"]) / long_run["tokens"]
    paced = paced_pair[1]
    paced_per_token = (paced["gw_cpu"] - per_request * paced["streams"]) / paced["tokens"]
    print(f"\nGateway CPU split (the two full-speed 50-stream levels, CPU = per request × requests + per token × "
          f"tokens): {per_request * 1000:.1f} ms per request + {per_token * 1e6:.0f} µs per token at full speed "
          f"(several upstream events per read and per client write). Paced at {paced['rate']} tokens/s, with the "
          f"same per-request cost: {paced_per_token * 1e6:.0f} µs per token.")
    if floor is not None:
        print(f"\nThe floor at the paced level's pacing ({paced['concurrency']} connections, {paced['rate']} events/s "
              f"each): a relay that only receives and sends each event (`python -m bench.relay_floor`, uvloop) spent "
              f"{floor['us_per_event']:.1f} µs of CPU per event in this run; the gateway's paced token "
              f"{paced['gw_cpu_us'] / floor['us_per_event']:.0f}× that (docs/performance.md, \"Paced tokens\").")
    worst_cpu = max(through["gw_cpu_us"] for _, through in rows)
    one = rows[0]
    added = one[1]["ttft_p50"] - one[0]["ttft_p50"]
    print("\nTargets:")
    print(f"- gateway CPU ≤ {TARGET_CPU_US_PER_TOKEN} µs per streamed token: "
          + ", ".join(f"{t['gw_cpu_us']:.0f} µs at {t['concurrency']}" for _, t in rows)
          + f" ({TOKENS}-token streams; in CPU seconds per 1,000 tokens: "
          + ", ".join(f"{t['gw_cpu_us'] / 1000:.3f}" for _, t in rows)
          + f") → {verdict(worst_cpu <= TARGET_CPU_US_PER_TOKEN)}; "
          f"{long_pair[1]['gw_cpu_us']:.0f} µs with {long_pair[1]['per_stream']}-token streams → "
          f"{verdict(long_pair[1]['gw_cpu_us'] <= TARGET_CPU_US_PER_TOKEN)}; marginal cost per token "
          f"{per_token * 1e6:.0f} µs at full speed → {verdict(per_token * 1e6 <= TARGET_CPU_US_PER_TOKEN)}")
    print(f"- paced tokens ({paced['rate']} tokens/s, one per event) ≤ {TARGET_PACED_US_PER_TOKEN} µs each (issue 20): "
          f"{paced['gw_cpu_us']:.0f} µs → {verdict(paced['gw_cpu_us'] <= TARGET_PACED_US_PER_TOKEN)} "
          f"({paced_per_token * 1e6:.0f} µs a token at the margin, the per-request part aside)")
    if pinned is not None:
        cpu, row = pinned
        errors = f", {row['errors']} errors" if row["errors"] else ""
        print(f"  (diagnostic, not the target's measure: {row['gw_cpu_us']:.0f} µs with the gateway pinned to CPU {cpu} "
              f"(SLUICE_CPUS={cpu}){errors}; docs/operations.md, \"Pinning a process to a CPU\")")
    print(f"- TTFT added ≤ {TARGET_TTFT_ADDED_MS} ms p50 at one stream: +{added:.2f} ms → "
          f"{verdict(added <= TARGET_TTFT_ADDED_MS)}")
    if one[0]["client_wait_ms"] is not None:
        print(f"  (the load generator's own wait for a core, per request: {one[0]['client_wait_ms']:.2f} ms direct, "
              f"{one[1]['client_wait_ms']:.2f} ms through the gateway; docs/performance.md, \"TTFT at one stream\")")
    short_added = short_pair[1]["ttft_p50"] - short_pair[0]["ttft_p50"]
    print(f"  (diagnostic, not the target's measure: +{short_added:.2f} ms with {short_pair[1]['per_stream']}-token "
          f"answers, where no rest of a stream keeps both cores busy)")
    print(f"- idle RSS ≤ {TARGET_IDLE_RSS_MB} MB: {mb(idle_cold):.1f} MB after start, {mb(idle_warm):.1f} MB warm → "
          f"{verdict(max(idle_cold, idle_warm) / 1e6 <= TARGET_IDLE_RSS_MB)}")
    print("  (the openai SDK's import and the o200k_base tokenizer are ~48 MB each of it: `python -m "
          "bench.import_memory`; docs/performance.md, \"The idle RSS's floor\")")
    exceptions = log_exceptions(stderr, "gateway-stderr")
    if exceptions:
        print(f"\nExceptions in the gateway's log (bench/results/gateway-stderr.log): {exceptions}")
