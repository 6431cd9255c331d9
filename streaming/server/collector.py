"""The cyclic garbage collector's policy for a server process (docs/performance.md, "The collector's pauses").

CPython frees an object when its last reference goes; the cyclic collector only finds groups of objects that refer to
each other, and Sluice's requests leave none (tests/streaming/server/test_reference_cycles.py). What the collector
costs a server is its pauses: a full collection walks every container object the process holds — the ~170,000 its
imports and set-up made, and ~200 for each stream in flight — with the event loop stopped, 75–200 ms at 1,000
streams on the benchmark's machine, every running stream's next token held for as long, and it ran three times in
a 12 s burst of 1,000 streams. Two changes, made once the application is loaded, before the first request:

- ``gc.freeze()``: what start-up made (modules, classes, functions, settings, the URL resolver) moves to the
  permanent generation, which no collection walks. It is never garbage: a server does not unload modules.
- The oldest generation is collected at most once every ``FULL_EVERY`` collections of the middle one (CPython's
  default: 10), and still only once what it holds has grown by a quarter since the last full collection (CPython's
  own rule, unchanged). The young generations keep CPython's defaults: their pauses are ~1–15 ms.

``SLUICE_GC=cpython`` leaves CPython's defaults (an A/B switch for the benchmarks, and a way back).
"""

import gc
import logging
import os

logger = logging.getLogger(__name__)

FULL_EVERY = 100  # collections of generation 1 between two full collections, at least (CPython: 10)


_configured = False


def configure():
    """Apply the policy, once a process: by Sluice's server (BackpressureServer.run) or at ASGI lifespan's start-up
    (Uvicorn), after the application is imported and before the first request."""
    global _configured
    if _configured or os.environ.get("SLUICE_GC", "").strip().lower() == "cpython":
        return
    _configured = True
    young, middle, _ = gc.get_threshold()
    gc.collect()  # what start-up left as garbage is not frozen with the rest
    gc.freeze()
    gc.set_threshold(young, middle, FULL_EVERY)
    logger.debug("Collector: %d start-up objects frozen; thresholds %r", gc.get_freeze_count(), gc.get_threshold())
