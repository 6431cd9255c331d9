"""Twisted's reactor on the chosen asyncio event loop: uvloop's (libuv) unless SLUICE_EVENT_LOOP=asyncio.

Daphne runs on Twisted's asyncio reactor, and `daphne.server` installs it, on the standard library's event loop,
when it is imported. Sluice installs it first, on uvloop's loop: every chunk of every stream is a few event-loop
callbacks (the provider's socket, the relay, the client's socket), and uvloop runs them for less CPU. Measured
on 500 streams at 20 tokens/s through one process: 83 instead of 88–93 µs of CPU per token, and a p99 added
inter-token delay of 14–22 ms instead of 35–43 ms (docs/performance.md).

The variable is read from the environment here, before Django's settings exist: this runs when the `streaming`
app is imported (INSTALLED_APPS lists it before `daphne`) and when `streaming.server` is. An unknown value falls
back to asyncio's loop, and the system check sluice.E009 then stops the server at start-up.
"""

import asyncio
import os
import sys

EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = "uvloop"


def event_loop_name() -> str:
    return os.environ.get("SLUICE_EVENT_LOOP", "").strip().lower() or DEFAULT_EVENT_LOOP


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # not built for this platform (Windows)
        return False
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    if event_loop_name() == "uvloop" and uvloop_available():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def install():
    """Install Twisted's asyncio reactor on that loop, unless a reactor is installed already.

    (`python -m daphne` — stock Daphne, for comparison — imports daphne.server first, and keeps asyncio's loop.)
    """
    global _loop
    if "twisted.internet.reactor" in sys.modules:
        return
    from twisted.internet import asyncioreactor

    _loop = new_event_loop()
    asyncioreactor.install(_loop)


_loop = None


def installed_loop():
    """The event loop this module installed Twisted's reactor on, or None if it did not install it (another
    reactor was installed first, e.g. by stock Daphne)."""
    return _loop
