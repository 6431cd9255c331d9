"""A server process pinned to CPUs: `SLUICE_CPUS` (a Linux CPU list, as `taskset -c` takes it: "1", "0-3", "0,2").

A server process runs on one core at a time (one event loop; the GIL). Left to the scheduler, its threads move
between cores, and a core's caches hold whatever ran there last — at a paced stream's rate the event loop sleeps and
wakes for nearly every token, and wakes on a core the load generator, the provider's simulator or another process
used meanwhile. Pinned to one core, with its database thread, the same paced level cost 9 % less CPU a token in six
alternating runs (51.3 against 56.2 µs; docs/performance.md, "Session 17"), with fewer context switches a token (0.37
voluntary against 0.45): the database thread's wake-up waits for the loop's turn to end instead of taking the other
core from it. What nginx's `worker_cpu_affinity` and HAProxy's `cpu-map` do, for the same reasons.

Off by default: one process on a machine that runs other things should go where the scheduler sends it. A fleet
(streaming/server/fleet.py, `--pin`) gives each of its processes a CPU of its own, in turn.

Applied once, at the server's start (Sluice's server in its run(), Uvicorn at ASGI lifespan's start-up), to every
thread the process has then; threads started later inherit it from the thread that starts them. A list the process
cannot run on (a CPU it is not allowed, or a malformed one) stops the server at start with the reason.
"""

import logging
import os

logger = logging.getLogger(__name__)

VARIABLE = "SLUICE_CPUS"


class AffinityError(ValueError):
    """SLUICE_CPUS names no CPU this process may use, or cannot be read."""


def parse(text: str) -> set[int]:
    """The CPUs of a Linux CPU list ("0-2,5" → {0, 1, 2, 5}); AffinityError if it is malformed or empty."""
    cpus = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise AffinityError(f"{VARIABLE}={text!r}: expected a CPU list such as 1, 0-3 or 0,2")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise AffinityError(f"{VARIABLE}={text!r}: {part} is an empty range")
        cpus.update(range(low, high + 1))
    return cpus


def allowed() -> set[int]:
    return set(os.sched_getaffinity(0))


def wanted(environ=os.environ) -> set[int] | None:
    """The CPUs SLUICE_CPUS asks for (None: not set, no pinning); AffinityError if the process may not run there."""
    text = environ.get(VARIABLE, "").strip()
    if not text:
        return None
    cpus = parse(text)
    if not hasattr(os, "sched_setaffinity"):
        raise AffinityError(f"{VARIABLE} is set, but this platform cannot pin a process (Linux only)")
    outside = cpus - allowed()
    if outside:
        raise AffinityError(f"{VARIABLE}={text!r}: this process may not run on CPU(s) "
                            f"{', '.join(map(str, sorted(outside)))} (it may use {format_list(allowed())})")
    return cpus


def format_list(cpus) -> str:
    return ",".join(map(str, sorted(cpus)))


def pin(cpus: set[int]):
    """Every thread of this process on `cpus`."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


_applied = False


def configure(environ=os.environ):
    """Pin this server process as SLUICE_CPUS asks, once; AffinityError (the server stops) if it cannot be."""
    global _applied
    if _applied:
        return
    cpus = wanted(environ)
    _applied = True
    if cpus is not None:
        pin(cpus)
        logger.info("Pinned to CPU(s) %s (%s)", format_list(cpus), VARIABLE)
