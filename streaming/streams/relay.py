"""The relay: provider events → bounded prefetch buffer → client, with backpressure end to end.

A pump task reads the provider's events (classified once, streaming/provider/events.py) into a `PrefetchBuffer`;
`parts()` takes whatever is buffered and yields it as one write. Served by Sluice's server, once the first token is
written the pump writes each part to the client itself through the server's body writer (`offer_writer`;
docs/backpressure.md, "Direct writes"): the buffer then carries only the stream's end. Tokens are metered through
the `meter` callback before they are written or buffered, so the client never receives a token its quota does not
cover; the relay knows nothing of quotas beyond that callback. A watchdog (watchdog.py) ends the stream on a stalled client, a silent provider or
the maximum duration, and calls `heartbeat` once a tick.

`close(outcome)` stops the provider and returns the `Ending` to settle; the stream's lifecycle
(completion.py) calls it, once, from the response generator's `finally` (or from the stall cut-off).
"""

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass

from quotas.domain.exceptions import CounterStoreDown, QuotaRefusal
from streaming.errors import MAPPED, ApiError, api_error
from streaming.provider.errors import UpstreamError
from streaming.provider.events import CHUNK, DONE, ERROR, choice_tokens

from .buffer import PrefetchBuffer, StreamFigures
from .watchdog import Watchdog

logger = logging.getLogger(__name__)

# A yield that takes longer than this waited on the client: one backpressure pause.
PAUSE_SECONDS = 0.005
HEARTBEAT = b": keep-alive\n\n"
OPENED = b": stream open\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
# How long a provider that sent [DONE] gets to end its body, so that its connection returns to the pool.
DRAIN_SECONDS = 0.25
OVERRUN = object()  # the provider streamed past max_tokens
ALL_CUT = object()  # n > 1: every choice streamed past max_tokens (each was ended with "length")
GONE = object()  # the client's connection is gone (a direct write found it closed)
# The relays writing a response in this process now, for the server's drain (end_all).
running: "weakref.WeakSet[Relay]" = weakref.WeakSet()
SHUTDOWN = ApiError("The server is restarting: retry the request.", status=503, type="server_error",
                    code="server_shutdown")


async def end_all():
    """End every running stream with a final error event (the server is shutting down and its drain time is up): each
    is settled as `worker_lost`, charged what it sent (streaming/server/shutdown.py calls this)."""
    for relay in list(running):
        await relay.end_early("worker_lost", SHUTDOWN)


@dataclass(frozen=True)
class Ending:
    """How a stream ended, for its settlement."""

    outcome: str  # a Usage.Status value
    figures: StreamFigures
    reported_usage: dict | None
    reason: str = ""  # the error code that ended it, if any


class Relay:
    """One streaming response's body. `meter(total)` is awaited before the client is sent more completion tokens
    than `covered` (the total it returned last): it returns the new covered total, or raises the refusal (a quota
    exhausted) that ends the stream with an error event.

    Chat's wire format; the legacy text completions and the Responses API subclass it (text_completions.py,
    responses.py), overriding the class attributes and the methods that write Sluice's own events (_ending, _overrun,
    _error_event): what they change costs chat nothing per event."""

    HEAD = b"data: "  # what precedes each event's `data` (Event.data) in the client's stream
    CHUNK_OBJECT = "chat.completion.chunk"  # the `object` of a chunk Sluice writes

    def __init__(self, events, *, request_id, include_usage, meter, heartbeat, on_stall, started, settings,
                 prompt_tokens=0, max_tokens=None, choices=1):
        self.request_id = request_id
        self.events = events
        self.include_usage = include_usage
        self.prompt_tokens = prompt_tokens  # Sluice's estimate, for a usage chunk of its own
        self.max_tokens = max_tokens  # the completion's budget: a provider that overruns it is cut there
        # n: with more than one choice, max_tokens binds each on its own (_per_choice).
        self.choices = choices
        if choices > 1:  # _per_choice's (made only then: ~0.5 KB a stream of the usual n = 1)
            self._choice_tokens = {}  # index -> tokens relayed
            self._choices_ended = set()  # indexes with a finish_reason, or cut at max_tokens
            self._choices_cut = set()
        self.finished = False  # a finish_reason came
        self.last_chunk = None  # the last chunk's payload: its id, model and created stamp, for chunks of Sluice's
        self.meter = meter
        self.covered = 0
        self.figures = StreamFigures()
        self.buffer = PrefetchBuffer(self.figures)
        self.outcome = None  # set by whoever ends the stream other than the client
        self.reason = ""
        self.reported_usage = None
        self.started = started
        self.yield_started = None  # monotonic time of the write in progress (None: not writing)
        self.reading_since = None  # when the pump began waiting for the provider (None: not waiting)
        self.draining = False  # [DONE] came; the pump reads the rest of the provider's body
        self.settings = settings
        self._pump_task = None
        # The server's body writer: offered when the response's parts go to the server as they are, taken by parts()
        # after the first token's write; from then on the pump writes each part itself.
        self._offered_writer = None
        self.writer = None
        self._handoff = None  # while events are pushed: the future that hands the pump what _on_pushed leaves it
        self._watchdog = Watchdog(self, heartbeat=heartbeat, on_stall=on_stall, settings=settings)
        self._closing = None

    def offer_writer(self, writer):
        """The server's body writer (streaming/streams/event_stream.py): parts() hands the writing to the pump once
        the first token is written, so that a token crosses no task switch, no generator and no `send()` message on
        its way out."""
        self._offered_writer = writer

    def is_paused(self) -> bool:
        started = self.yield_started
        return started is not None and time.monotonic() - started > PAUSE_SECONDS

    async def parts(self):
        """The response's content: the buffered events, one write per take, heartbeats while none come."""
        figures, buffer = self.figures, self.buffer
        self._pump_task = asyncio.create_task(self._pump())
        self._watchdog.start(asyncio.current_task())
        running.add(self)
        heartbeat = self.settings.STREAM_HEARTBEAT_INTERVAL
        try:
            if self.events.awaiting_first_token:
                # A slow provider: flush the response headers now (some servers send them with the first body
                # bytes), heartbeats follow. Otherwise the first token is in and is the first write.
                yield OPENED
            while True:
                data = await buffer.take(heartbeat if figures.first_token_at is None else None)
                if data is None:
                    return
                if not data:
                    data = HEARTBEAT  # keeps proxies from closing an idle connection
                self.yield_started = started = time.monotonic()
                yield data
                waited = time.monotonic() - started
                self.yield_started = None
                figures.bytes_sent += len(data)
                if waited > PAUSE_SECONDS:
                    figures.pauses += 1
                    figures.paused_seconds += waited
                if (self._offered_writer is not None and figures.first_token_at is not None and not buffer.parts
                        and not buffer.ended):
                    # Nothing is waiting to be written (so the pump's writes follow this one in order), the headers
                    # are out and no heartbeat is due any more: the pump writes from now on; this generator waits
                    # for the stream's end.
                    self.writer, self._offered_writer = self._offered_writer, None
        finally:
            self.yield_started = None
            running.discard(self)
            self._watchdog.stop()

    async def _pump(self):
        """Read provider events into the buffer, metering each batch's tokens before it is buffered.

        The events of one read are buffered as one part (one write to a client that keeps up, coalesced with more
        for one that doesn't).
        """
        figures, include_usage, head = self.figures, self.include_usage, self.HEAD
        final = b""
        first = True
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    break
                if type(batch) is not list:
                    if batch is GONE:
                        self.outcome = self.outcome or "client_disconnected"
                        self.buffer.end()
                        return
                    raise batch  # what broke the pushed events off (an UpstreamError, or a failure of the relay's)
                writer = self.writer
                if writer is not None and not writer.open:
                    await self._wait_for_client(writer)  # the client fell behind a pushed write (_on_pushed)
                if self.draining:
                    continue
                parts = []
                stop = None  # what ends the stream after this batch's earlier events are delivered
                for event in batch:
                    kind = event.kind
                    if kind == CHUNK:
                        self.last_chunk = event.data
                        if event.usage:
                            self.reported_usage = event.usage
                        data, tokens, cut = event.data, event.tokens, ()
                        if self.choices > 1 and event.has_choices:
                            data, tokens, cut = self._per_choice(event)
                        elif event.finished:
                            self.finished = True
                        if tokens:
                            total = figures.completion_tokens + tokens
                            if self.choices == 1 and self.max_tokens is not None and total > self.max_tokens:
                                stop = OVERRUN  # the provider ignored max_tokens: the gateway enforces it
                                break
                            if total > self.covered:
                                try:
                                    self.covered = await self.meter(total)
                                except MAPPED as refusal:  # the quota ran out (or its store is down)
                                    stop = refusal
                                    break
                            figures.completion_tokens = total
                            if figures.first_token_at is None:
                                figures.first_token_at = time.monotonic()
                        elif event.usage and not event.has_choices and not include_usage:
                            continue  # Sluice always asks for usage; the client gets it only if it asked
                        if data is not None:
                            parts.append(head + data + b"\n\n")
                        if cut:
                            parts.extend(self._chunk_of_ours({"choices": [
                                {"index": index, "delta": {}, "finish_reason": "length"}]}) for index in cut)
                            if len(self._choices_cut) >= self.choices:
                                stop = ALL_CUT
                                break
                    elif kind == DONE:
                        self.outcome = self.outcome or "completed"
                        # The client has its answer now; read the body's end so the provider's connection goes
                        # back to the pool instead of being closed mid-response.
                        self.draining = True
                        break
                    elif kind == ERROR:
                        # The provider failed mid-answer; its message may name internals, so use ours.
                        logger.warning("upstream error event mid-stream for %s", self.request_id)
                        stop = UpstreamError(502, "upstream_error", "The upstream provider failed while answering.")
                        break
                    else:
                        stop = UpstreamError(502, "upstream_error", "The upstream provider sent an event that is not "
                                                                    "JSON.")
                        break
                if parts:
                    part = parts[0] if len(parts) == 1 else b"".join(parts)
                    # put() (or the writer's wait) waits while the client is behind: meanwhile this frame holds no
                    # other copy of the events (the read's payloads, the parts).
                    batch = parts = event = data = None
                    writer = self.writer
                    if writer is None:
                        await self.buffer.put(part)
                    elif writer.write(part):
                        figures.bytes_sent += len(part)
                        part = None
                        if not writer.open:
                            await self._wait_for_client(writer)
                    else:  # the connection is gone
                        stop = GONE
                    part = None
                    if first and writer is None:
                        first = False
                        # One loop turn, for the response to write the first token before this task reads on: a
                        # provider that is ahead would otherwise keep it relaying the rest of its answer first.
                        await asyncio.sleep(0)
                if stop is GONE:
                    self.outcome = self.outcome or "client_disconnected"
                    self.buffer.end()
                    return
                if stop is ALL_CUT:
                    self.outcome = "completed"
                    self.buffer.end(self._ending())
                    return
                if stop is OVERRUN:
                    self.outcome = "completed"
                    self.buffer.end(self._overrun())
                    return
                if stop is not None:
                    raise stop
                if self.draining:
                    self.buffer.end(self._ending())
            if not self.draining:
                if not self.finished:
                    raise UpstreamError(502, "upstream_error", "The upstream provider ended the answer early.")
                # The answer was complete (a finish_reason came) but the body ended without [DONE] (some servers,
                # or a proxy that drops it): the client gets its end as usual.
                self.outcome = self.outcome or "completed"
                self.buffer.end(self._ending())
        except MAPPED as error:
            if isinstance(error, UpstreamError) and self.draining:  # the answer was complete; only its tail failed
                return
            final = self._ended_by(error)
        except Exception:
            logger.exception("relay failed for %s", self.request_id)
            final = self._ended_by(ApiError("The gateway failed while relaying the answer.", status=500,
                                            type="server_error", code="internal_error"))
        finally:
            # Stop the provider now: don't wait for the client to drain the buffer.
            await self.events.aclose()
        if not self.buffer.ended:
            self.buffer.end(final)

    async def _next_batch(self):
        """The provider's next events. While the pump writes directly, they are pushed (`_on_pushed` relays a token's
        events from the provider connection's own callback, with no task waking up) and this task gets only what
        `_on_pushed` leaves to it: events to meter or that end the answer, the body's end (None), an error, GONE, or
        [] when the client fell behind. Otherwise (or when the events cannot be pushed) they are read."""
        if self.writer is not None and not self.draining:
            self._handoff = handoff = asyncio.get_running_loop().create_future()
            if self.events.push(self._on_pushed):
                self.reading_since = time.monotonic()
                try:
                    return await handoff
                finally:
                    self._handoff = self.reading_since = None
            self._handoff = None
        self.reading_since = time.monotonic()
        batch = await self.events.read_batch()
        self.reading_since = None
        return batch

    def _on_pushed(self, batch) -> bool:
        """A batch of events, pushed from the provider connection's callback: relayed here if every event is a
        token the meter's last answer covers (or carries none), one write for the batch; otherwise (and at the end
        of the body, or an error) what is left goes to the pump's task (`_next_batch`). True: push the next
        batch too."""
        handoff = self._handoff
        if handoff is None or handoff.done():
            return False
        try:
            if type(batch) is not list:
                handoff.set_result(batch)
                return False
            figures, head, parts, rest = self.figures, self.HEAD, [], None
            if self.choices > 1:
                rest = batch
            else:
                for index, event in enumerate(batch):
                    if event.kind != CHUNK or event.usage or event.finished:
                        rest = batch[index:]
                        break
                    tokens = event.tokens
                    if tokens:
                        total = figures.completion_tokens + tokens
                        if total > self.covered or (self.max_tokens is not None and total > self.max_tokens):
                            rest = batch[index:]  # the meter's turn, or the provider overran max_tokens
                            break
                        figures.completion_tokens = total
                    self.last_chunk = data = event.data
                    parts.append(head + data + b"\n\n")
            if parts:
                part = parts[0] if len(parts) == 1 else b"".join(parts)
                writer = self.writer
                if not writer.write(part):
                    handoff.set_result(GONE)
                    return False
                figures.bytes_sent += len(part)
                if not writer.open:
                    handoff.set_result(rest or [])  # the pump waits for the client first
                    return False
            if rest is not None:
                handoff.set_result(rest)
                return False
            self.reading_since = time.monotonic()
            return True
        except Exception as exc:  # a failure of the relay's own: the pump reports it, as if a read had raised it
            if not handoff.done():
                handoff.set_result(exc)
            return False

    async def _wait_for_client(self, writer):
        """After a direct write, while the client is behind: wait as the response's `send()` would have (the wait
        counts as a write in progress, for the watchdog's stall cut-off, the live panel and the pause figures)."""
        self.yield_started = started = time.monotonic()
        try:
            await writer.wait()
        finally:
            self.yield_started = None
        waited = time.monotonic() - started
        if waited > PAUSE_SECONDS:
            self.figures.pauses += 1
            self.figures.paused_seconds += waited

    def _per_choice(self, event):
        """n > 1: each choice held to max_tokens on its own. A choice whose next delta would pass it is ended there
        with a chunk of Sluice's (finish_reason "length" for its index) and what it sends after is dropped, while the
        others go on. Returns (the payload to relay, None for nothing; its tokens; the indexes ended now). Parses the
        payload a second time: only requests with n > 1 pay for it."""
        chunk = json.loads(event.data)
        choices = chunk["choices"]
        kept, cut, tokens = [], [], 0
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            if index in self._choices_cut:
                continue
            used, count = self._choice_tokens.get(index, 0), choice_tokens(choice)
            if self.max_tokens is not None and used + count > self.max_tokens:
                self._choices_cut.add(index)
                self._choices_ended.add(index)
                cut.append(index)
                continue
            self._choice_tokens[index] = used + count
            tokens += count
            if choice.get("finish_reason"):
                self._choices_ended.add(index)
            kept.append(choice)
        if len(self._choices_ended) >= self.choices:
            self.finished = True
        if len(kept) == len(choices):
            return event.data, tokens, cut
        if not kept and not event.usage:
            return None, tokens, cut
        chunk["choices"] = kept
        return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode(), tokens, cut

    def _ending(self) -> bytes:
        """The stream's last events: a usage chunk of Sluice's own count if the client asked for usage and the
        provider sent none (the ledger then says the count is Sluice's), and [DONE]."""
        if self.include_usage and not self.reported_usage:
            completion = self.figures.completion_tokens
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                     "total_tokens": self.prompt_tokens + completion}
            return self._chunk_of_ours({"choices": [], "usage": usage}) + DONE_EVENT
        return DONE_EVENT

    def _overrun(self) -> bytes:
        """The stream's end when the provider passed max_tokens: the answer ends there, as if at its limit."""
        return self._chunk_of_ours({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}) + self._ending()

    def _chunk_of_ours(self, fields) -> bytes:
        """A chunk Sluice writes into the stream, with the provider's id, model and created stamp."""
        try:
            last = json.loads(self.last_chunk) if self.last_chunk else {}
        except ValueError:
            last = {}
        chunk = {"id": last.get("id", self.request_id), "object": self.CHUNK_OBJECT,
                 "created": last.get("created", int(time.time())), "model": last.get("model", ""), **fields}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _ended_by(self, error) -> bytes:
        """Record what ended the stream and return the error event that tells the client."""
        api = api_error(error)
        # A refusal (the quota ran out, the account was suspended) is the client's; a failure (provider, counter
        # store, gateway) is not.
        if isinstance(error, CounterStoreDown):
            self.outcome = "store_unavailable"
        elif isinstance(error, QuotaRefusal):
            self.outcome = "quota_exhausted"
        else:
            self.outcome = "upstream_error"
        self.reason = api.code or ""
        return self._error_event(api)

    def _error_event(self, error: ApiError) -> bytes:
        """The event(s) that end a stream cut short: the error, in OpenAI's shape (SDKs raise it as APIError)."""
        return error.sse_event()

    async def end_early(self, outcome, error: ApiError):
        """Stop the provider and end the client's stream with `error` as its last event (the watchdog's timers, the
        server's drain). A stream whose end is already buffered is left to finish."""
        if self.buffer.ended:
            return
        self.outcome, self.reason = outcome, error.code
        self._pump_task.cancel()
        await self.events.aclose()
        if not self.buffer.ended:
            self.buffer.end(self._error_event(error))

    async def close(self, outcome=None) -> Ending:
        """Stop reading the provider and close its stream; returns how the stream ended: `outcome` when the caller
        knows better (the client went away, or stalled), otherwise the relay's own. Once, whoever asks first.

        A task of its own, awaited through a shield: the server cancels the response's handler when the client goes
        away, which may happen while this runs (a client that leaves right after [DONE]); the provider must still be
        closed.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(outcome))
        return await asyncio.shield(self._closing)

    async def _close(self, outcome) -> Ending:
        self._watchdog.stop()
        if self._pump_task is not None:
            if self.draining:
                # The body's end follows [DONE] at once from a well-behaved provider: let the pump read it.
                await asyncio.wait([self._pump_task], timeout=DRAIN_SECONDS)
            self._pump_task.cancel()
            # The pump closes the provider's stream in its own finally.
            await asyncio.wait([self._pump_task])
        self.buffer.discard()
        await self.events.aclose()
        self.meter = None  # the lifecycle's (it holds this relay): no cycle left once the stream is over
        return Ending(outcome or self.outcome or "completed", self.figures, self.reported_usage, self.reason)
