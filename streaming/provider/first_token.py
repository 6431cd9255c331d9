"""An upstream stream opened up to its first token, and the permit it holds until it closes.

The gateway answers the client only once the first token is in (docs/resilience.md): until then nothing has
reached the client, so a provider that fails, stalls or ends early is simply asked again. The first-token timeout
aborts the request — the read it cancels must not survive. After the first token, no read is ever cancelled by a
timer here: silence between chunks is the HTTP client's read timeout (UPSTREAM_IDLE_TIMEOUT).
"""

import asyncio
import time

from django.conf import settings

from quotas.store.base import OUTCOME_FAILED, OUTCOME_OK

from . import client
from .endpoints import CHAT
from .errors import UpstreamError
from .events import DONE, ERROR, Event
from .permits import preempted


async def open_to_first_token(target, body, request_id, timeout_seconds, commit_after_seconds, endpoint=CHAT):
    """(events, events read so far, pending read) once the first content arrived; retryable errors otherwise.

    A provider slower than `commit_after_seconds` (the heartbeat interval) is not held against the client: the
    stream is returned with its read still pending (never cancelled), the client gets its headers and heartbeats,
    and the rest of the first-token timeout is the relay's watchdog's (streaming/streams/watchdog.py).
    """
    events = pending = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    commit_at = loop.time() + commit_after_seconds
    try:
        async with asyncio.timeout_at(deadline):
            events = await client.open_stream(target, body, request_id, endpoint)
        seen = []
        while True:
            pending = asyncio.ensure_future(events.read_batch())
            done, _ = await asyncio.wait([pending], timeout=max(0.0, min(deadline, commit_at) - loop.time()))
            if not done:
                # Which limit was reached, from the limits themselves: a loop's clock may read a hair before the
                # deadline when its timer fires (uvloop's has millisecond resolution).
                if deadline <= commit_at:
                    raise TimeoutError
                return events, seen, pending
            batch = pending.result()
            pending = None
            if batch is None:
                raise UpstreamError(502, "upstream_error", "The upstream provider ended the answer before "
                                    "its first token.", retryable=True)
            seen.extend(batch)
            for event in batch:
                if event.kind == ERROR:
                    raise UpstreamError(502, "upstream_error", "The upstream provider failed before its first "
                                        "token.", retryable=True)
                if event.begins_answer:
                    return events, seen, None
    except BaseException as exc:
        if pending is not None:
            pending.cancel()
        if events is not None:
            await asyncio.shield(events.aclose())
        if isinstance(exc, TimeoutError):
            raise UpstreamError(504, "upstream_timeout", f"The upstream provider sent no first token within "
                                f"{timeout_seconds:g} s.", retryable=True) from None
        raise


class GuardedStream:
    """The upstream's event batches (those read before the first token first), holding the permit until `aclose`.

    The permit is renewed as events flow (one store call per third of its TTL, never per token) and given back
    with the stream's outcome: ok once [DONE] came or the gateway stopped reading; failed if the provider broke
    off or sent an error event.
    """

    def __init__(self, events, seen, permit, pending=None):
        self._events = events
        self._seen = seen
        self._pending = pending  # a read begun before the response was committed
        self._permit = permit
        self._renew_every = settings.UPSTREAM_PERMIT_TTL / 3
        self._renew_at = time.monotonic() + self._renew_every
        self.outcome = None
        self.closed = False
        self._renewal = None  # a renewal due while the events were pushed (push)
        # The permit may end this stream for another user while its reader has stopped (permits.py: preemption).
        permit.attach(self)

    @property
    def awaiting_first_token(self) -> bool:
        """True when the stream was handed over before its first token (a slow provider)."""
        return self._pending is not None

    async def read_batch(self) -> list[Event] | None:
        """The next events, or None at the end of the provider's body."""
        permit = self._permit
        if permit.preempted:
            raise preempted()
        if self._seen:
            batch, self._seen = self._seen, []
            permit.idle_since = time.monotonic()
            return self._note(batch)
        permit.idle_since = None  # waiting for the provider, not for the reader
        try:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                batch = await pending
            else:
                batch = await self._events.read_batch()
        except UpstreamError:
            self.outcome = OUTCOME_FAILED
            raise
        if batch is None:
            self.outcome = self.outcome or OUTCOME_FAILED  # ended without [DONE]
            return None
        now = permit.idle_since = time.monotonic()
        if now >= self._renew_at:
            self._renew_at = now + self._renew_every
            await permit.renew()
        return self._note(batch)

    def push(self, on_batch) -> bool:
        """The events as they arrive, handed to `on_batch` from the provider connection's callback (EventStream.push:
        the same contract); False if they cannot be (then read_batch() as usual). The permit's bookkeeping is
        read_batch()'s: its reader waits for the provider between two batches, and has stopped reading (it may be
        preempted) only once `on_batch` returned False; a renewal falls due in a task of its own."""
        permit = self._permit
        if self._seen or self._pending is not None or permit.preempted or self.closed:
            return False

        def pushed(batch):
            now = permit.idle_since = time.monotonic()
            if type(batch) is not list:
                if batch is None:
                    self.outcome = self.outcome or OUTCOME_FAILED  # ended without [DONE]
                elif isinstance(batch, UpstreamError):  # the provider broke off
                    self.outcome = OUTCOME_FAILED
                return on_batch(batch)
            if now >= self._renew_at:
                self._renew_at = now + self._renew_every
                self._renewal = asyncio.ensure_future(permit.renew())
            self._note(batch)
            if on_batch(batch):
                permit.idle_since = None  # waiting for the provider again
                return True
            return False

        if not self._events.push(pushed):
            return False
        permit.idle_since = None
        return True

    def _note(self, batch):
        for event in batch:
            if event.kind == DONE or event.finished:
                self.outcome = OUTCOME_OK  # a provider may end its body without [DONE] after a finish_reason
            elif event.kind == ERROR:
                self.outcome = OUTCOME_FAILED
        return batch

    async def aclose(self):
        """Close the provider's stream (it stops generating), then give the permit back."""
        if self.closed:
            return
        self.closed = True
        if self._pending is not None:
            self._pending.cancel()
        try:
            await self._events.aclose()
        finally:
            await self._permit.release(self.outcome or OUTCOME_OK)
