"""Daphne with HTTP backpressure: the application's ``await send()`` waits while the client's socket is full.

Stock Daphne 4.2 writes each body chunk into Twisted's transport and returns at once, and registers no producer
on the connection, so Twisted's "stop, the send buffer is full" signal reaches nobody and a client that stops
reading makes the server buffer the whole stream. Here each HTTP request gets a push producer (a "gate") on its
HTTPChannel, and ``handle_reply`` waits on it after every body chunk. See docs/backpressure.md.
"""

# Twisted's asyncio reactor on uvloop's loop (reactor.py), before daphne.server installs it on asyncio's.
from streaming.server import reactor  # isort:skip

reactor.install()

from daphne.server import Server  # noqa: E402  isort:skip

import asyncio
import logging
import os
import warnings
from functools import partial
from http import HTTPStatus

import daphne
from daphne.http_protocol import HTTPFactory, WebRequest
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.web.http_headers import Headers
from zope.interface import implementer

from streaming.server import affinity, collector
from streaming.server.fleet import PID_HEADER, PID_HEADER_VARIABLE
from streaming.server.intake import BoundedHTTPFactory
from streaming.server.shutdown import DrainingServer

logger = logging.getLogger(__name__)

# The gate relies on how Daphne calls protocol_connected/protocol_disconnected and on HTTPChannel's producer
# handling; both were read and tested against these versions (Twisted 26.10.0).
TESTED_DAPHNE_VERSION = "4.2.3"

# How many bytes a connection's Twisted write buffer may hold before Twisted pauses the app's send() (Twisted's
# default, FileDescriptor.bufferSize, is 64 KiB). Twisted checks only after a write, and resumes a paused app only
# once that buffer is empty, so a paused connection holds what the app wrote since the last resume: up to this
# much plus the last chunk. The first chunk after a resume is the relay's refilled prefetch buffer (up to
# STREAM_BUFFER_BYTES, 64 KiB); at 64 KiB it often did not pause the app and a second chunk followed (measured:
# 60 chunks of ~64 KiB held for 30 paused streams), at 32 KiB the first one does. Lower costs a client that keeps
# up: at 16 KiB every 16 KiB chunk costs a pause and a reactor turn (a raw 16 KiB-chunk stream: ~13,000
# chunks/s instead of ~22,000, twice the server CPU per chunk); at 32 KiB the rate was 19,600-21,700 chunks/s.
# Twisted also reads the socket in pieces of bufferSize (tcp.Connection.doRead), which is ample for requests.
SEND_BUFFER_BYTES = 32 * 1024

if daphne.__version__ != TESTED_DAPHNE_VERSION:
    warnings.warn(
        f"streaming.server.backpressure.BackpressureServer was tested against daphne {TESTED_DAPHNE_VERSION}, "
        f"but daphne {daphne.__version__} is installed: run tests/streaming/server/test_backpressure_server.py before trusting "
        "its HTTP backpressure.",
        RuntimeWarning,
        stacklevel=2,
    )


class Mailbox:
    """An HTTP request's application queue: the messages Daphne's WebRequest puts (`put_nowait`: the body, then at
    most a disconnect) and the application's `receive` takes (`get`), in order.

    What Daphne uses an asyncio.Queue for: its four deques (its getters, putters, items, and its `join()` Event's
    waiters) held ~2.6 KB for the whole life of every stream, for a request that puts one or two messages and a
    `receive` waited on by one task at a time (Django's disconnect listener). Here: a list, and the futures of the
    `get()`s waiting, made when one waits. Every waiter is woken by a put and takes its turn (one that finds
    nothing waits again), so a cancelled waiter strands no message.
    """

    __slots__ = ("_messages", "_waiters", "_on_body_end")

    def __init__(self, on_body_end=None):
        self._messages = []
        self._waiters = None
        self._on_body_end = on_body_end  # called once the request's last body message is in

    def put_nowait(self, message):
        self._messages.append(message)
        if self._on_body_end is not None and not message.get("more_body", False):
            on_body_end, self._on_body_end = self._on_body_end, None
            on_body_end()
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def get(self):
        while not self._messages:
            if self._waiters is None:
                self._waiters = []
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        return self._messages.pop(0)


@implementer(IPushProducer)
class ResponseGate:
    """One request's pause/resume signal from Twisted (open = the app may send more).

    Twisted calls these methods from the asyncio reactor's callbacks, i.e. on the event loop's own thread, so no
    ``call_soon_threadsafe`` is needed. The asyncio.Event a paused app waits on is made the first time one waits:
    most connections are never paused, and an Event (its waiters' deque) is ~750 bytes a stream (issue 20, item 2).
    """

    __slots__ = ("channel", "_open", "_event")

    def __init__(self, channel):
        self.channel = channel
        self._open = True
        self._event = None

    def pauseProducing(self):
        self._open = False
        if self._event is not None:
            self._event.clear()

    def resumeProducing(self):
        self._open = True
        if self._event is not None:
            self._event.set()

    def stopProducing(self):
        # The connection is going away: release the app; Daphne drops its later sends.
        self.resumeProducing()

    @property
    def open(self) -> bool:
        """The app may send more (checked before awaiting `wait`: no coroutine per chunk while the client keeps up)."""
        return self._open

    async def wait(self):
        if self._open:
            return
        if self._event is None:
            self._event = asyncio.Event()  # not set: paused
        await self._event.wait()


class BackpressureServer(DrainingServer, Server):
    """Daphne's Server whose HTTP ``send()`` blocks while Twisted has paused the connection's producer."""

    send_buffer_bytes = SEND_BUFFER_BYTES

    def run(self):
        loop = reactor.installed_loop()
        logger.info("Event loop: %s.%s", type(loop).__module__, type(loop).__qualname__)
        try:
            affinity.configure()  # SLUICE_CPUS, before the server's threads start (they inherit it)
        except affinity.AffinityError as exc:
            raise SystemExit(f"streaming.server: {exc}") from None
        collector.configure()  # the application is imported by now (daphne's command line does it first)
        super().run()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gates = {}  # WebRequest -> its ResponseGate, until Daphne reports the request disconnected
        self._channel_gates = {}  # HTTPChannel -> the one ResponseGate registered on it
        self._written_through = set()  # requests whose last body chunk was written at once, this loop turn
        # Which process answered, for a fleet's tests and benchmark (streaming/server/fleet.py, --pid-header).
        self._pid_header = (PID_HEADER, str(os.getpid()).encode()) if os.environ.get(PID_HEADER_VARIABLE) else None

    @property
    def http_factory(self):
        return self.__dict__.get("_http_factory")

    @http_factory.setter
    def http_factory(self, factory):
        # Daphne's run() builds its own HTTPFactory (daphne.server's module name, no hook to pass a class): serve with
        # BoundedHTTPFactory instead, whose requests refuse an oversized or unauthenticated body unread (intake.py).
        self.__dict__["_http_factory"] = BoundedHTTPFactory(self) if type(factory) is HTTPFactory else factory

    def protocol_connected(self, protocol):
        super().protocol_connected(protocol)
        if isinstance(protocol, WebRequest):
            # Twisted parses form bodies into request.args, which Daphne never reads, and answers a bare 400 (no
            # content type, no body) to one it cannot parse, before the application sees the request: let the
            # application, which reads the body itself, answer. (Twisted's constructor argument
            # parsePOSTFormSubmission, for the Request Daphne builds; this runs before the body has arrived.)
            protocol._parsePOSTFormSubmission = False
        # Only plain HTTP requests are gated: WebSocket protocols have no channel (and no flow control in
        # Daphne at all, django/daphne#170).
        channel = getattr(protocol, "channel", None)
        if not isinstance(protocol, WebRequest) or not hasattr(channel, "registerProducer"):
            return
        previous = self._channel_gates.pop(channel, None)
        if previous is not None:
            # A pipelined request is built inside the previous request's finish(), before that request's
            # protocol_disconnected runs, and HTTPChannel accepts only one producer at a time: hand over.
            channel.unregisterProducer()
            previous.resumeProducing()
        gate = ResponseGate(channel)
        transport = getattr(channel, "transport", None)
        if transport is not None and hasattr(transport, "bufferSize"):
            # Pause this connection's app sooner than Twisted's 64 KiB default (see SEND_BUFFER_BYTES).
            transport.bufferSize = self.send_buffer_bytes
        # On the channel, not the Request: a producer left on a Request makes Request.finish() log CRITICAL
        # "Producer was not unregistered", and the channel is where the transport's pause/resume arrives.
        channel.registerProducer(gate, True)
        self._gates[protocol] = gate
        self._channel_gates[channel] = gate

    def protocol_disconnected(self, protocol):
        # Called on finish(), on connection loss and on a WebSocket upgrade (the Request's channel may already be
        # gone by then, hence gate.channel).
        super().protocol_disconnected(protocol)
        gate = self._gates.pop(protocol, None)
        if gate is None:
            return
        gate.resumeProducing()  # wake a send() still waiting: the response is over
        if self._channel_gates.get(gate.channel) is gate:
            del self._channel_gates[gate.channel]
            gate.channel.unregisterProducer()

    def create_application(self, protocol, scope):
        if not isinstance(protocol, WebRequest):  # a WebSocket: Daphne's own
            return super().create_application(protocol, scope)
        gate = self._gates.get(protocol)
        if gate is not None:
            # The body writer (BodyWriter, below) for the application's streams, as an ASGI extension.
            scope["extensions"] = {**scope.get("extensions", {}),
                                   BODY_WRITER: {"writer": BodyWriter(self, protocol, gate)}}
        # Daphne's create_application, with a Mailbox instead of an asyncio.Queue as the request's application
        # queue (what Daphne's WebRequest puts its body and its disconnect into, and `receive` reads).
        assert "application_instance" not in self.connections[protocol]
        # Once Daphne has put the whole body into the mailbox (its process(), right after this returns), Twisted's
        # copy of it (Request.content: a BytesIO, or a temporary file past 100 KB) is read by no one: closed then, as
        # Twisted itself does when the request finishes, rather than kept for as long as the answer streams.
        mailbox = Mailbox(on_body_end=protocol.content.close)
        scope.setdefault("asgi", {"version": "3.0"})
        application = self.application(scope=scope, receive=mailbox.get, send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            return None
        instance = self.connections[protocol]["application_instance"] = asyncio.ensure_future(application)
        instance.add_done_callback(lambda _: self._abort_unfinished(protocol))
        return mailbox

    @staticmethod
    def _abort_unfinished(protocol):
        # An app that ends mid-response (e.g. Sluice cutting off a stalled reader by cancelling it) leaves a
        # response that can never complete, and stock Daphne keeps such a connection open. Drop it, as Uvicorn
        # does; abort rather than close, since a stalled client would never drain what is buffered.
        if protocol._response_started and not protocol.finished and protocol.channel is not None:
            protocol.channel.transport.abortConnection()

    async def handle_reply(self, protocol, message):
        if message.get("type") == "http.response.start":
            if self._pid_header is not None:
                message = {**message, "headers": [*message.get("headers", ()), self._pid_header]}
            await super().handle_reply(protocol, message)
            _set_reason(protocol, message.get("status"))
            return
        if message.get("type") != "http.response.body" or not message.get("more_body", False):
            await super().handle_reply(protocol, message)
            return
        self.write_body(protocol, message.get("body", b""))
        gate = self._gates.get(protocol)
        if gate is not None and not gate.open:
            # The chunk is in Twisted's buffer; while the client is not reading, hold the app here.
            await gate.wait()

    def write_body(self, protocol, body: bytes) -> bool:
        """A body chunk of a response under way (not its last): what Daphne's `handle_reply` does with an
        `http.response.body` message with `more_body`, without its coroutine. False if the connection is gone
        (nothing written, as Daphne drops such a message)."""
        connection = self.connections.get(protocol)
        if connection is None or connection.get("disconnected"):
            return False
        # A finished Request has no channel attribute any more (Twisted deletes it).
        transport = getattr(getattr(protocol, "channel", None), "transport", None)
        idle = (isinstance(transport, tcp.Connection) and not _buffered(transport)
                and protocol not in self._written_through)
        if not (idle and WRITE_THROUGH_UNREGISTERED and self._send_chunk(protocol, body, transport)):
            message = {"type": "http.response.body", "body": body, "more_body": True}
            if idle and WRITE_THROUGH_UNREGISTERED:
                self._write_through(protocol, message, transport)
            else:
                self._buffered_reply(protocol, message, transport, idle)
        return True

    def _send_chunk(self, protocol, body, transport) -> bool:
        """A body chunk of a response already under way, framed and written to an idle connection's socket here, in
        one system call: what Daphne's `handle_reply`, Twisted's `Request.write` (its checks, `toChunk`'s four
        pieces), `HTTPChannel.writeSequence`, the transport's `writeSequence` and `doWrite` do for it, per token of a
        paced stream, with the same outcome. Only for a chunked response whose head is written (Twisted's
        `startedWriting`, `chunked`) on a live connection; False (nothing done) otherwise, and Daphne's path runs.
        What the socket does not take, or an error, is handed to the transport's own `write()`, which buffers it and
        asks the reactor to watch the socket (its `doWrite` then meets the error and closes the connection), as
        before; the gate then pauses the app past SEND_BUFFER_BYTES. Once per connection per loop turn
        (`_buffered_reply`)."""
        if not (protocol.chunked and protocol.startedWriting) or protocol.finished or protocol._disconnected:
            return False
        if transport.disconnected or transport.disconnecting:
            return False
        protocol.sentLength += len(body)
        if not body:
            return True
        data = b"%x\r\n%b\r\n" % (len(body), body)
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN (full), or an error the transport's doWrite meets again and handles
            sent = 0
        if sent < len(data):
            self._written_through.add(protocol)
            asyncio.get_running_loop().call_soon(self._written_through.discard, protocol)
            transport.write(data[sent:])
        return True

    def _write_through(self, protocol, message, transport):
        """Write a chunk to an idle connection's socket at once, without registering the socket for write events
        first: Twisted's write() asks the reactor to watch the socket (an epoll_ctl, and asyncio's add_writer), and
        the doWrite() that empties the buffer right after asks it to stop (another epoll_ctl, remove_writer) — per
        chunk, i.e. per token of a paced stream. Only what the socket does not take (or an error, which the reactor's
        doWrite then meets and handles) is left to the reactor, which is then asked to watch the socket, as before.
        Once per connection per loop turn (see `_buffered_reply`)."""
        transport.startWriting = _not_yet  # handle_reply writes synchronously: no other code runs meanwhile
        head = not protocol.startedWriting
        try:
            protocol.handle_reply(message)
        finally:
            del transport.startWriting
        if head:
            _head_written(protocol)
        if not _buffered(transport):
            return
        self._written_through.add(protocol)
        asyncio.get_running_loop().call_soon(self._written_through.discard, protocol)
        if transport.disconnected or transport.disconnecting or transport.doWrite() is not None or _buffered(
                transport):
            transport.startWriting()

    def _buffered_reply(self, protocol, message, transport, idle):
        head = not protocol.startedWriting
        protocol.handle_reply(message)
        if head:
            _head_written(protocol)
        if idle and not (transport.disconnected or transport.disconnecting) and _buffered(transport):
            # Write now, as asyncio's transports do when nothing is queued, rather than on the reactor's next turn
            # (which first runs every other ready callback, e.g. the relay reading more of the provider's answer):
            # a stream's first token reaches the socket sooner. Anything the socket does not take stays buffered
            # for the reactor, as before; so does an error, which the reactor's own doWrite then meets and handles.
            # Once per connection per loop turn: an app that sends chunk after chunk without waiting would
            # otherwise fill the kernel's send buffer (megabytes on loopback) before it ever yields; its later
            # chunks wait in Twisted's buffer for the reactor, and pause the app past SEND_BUFFER_BYTES, as before.
            self._written_through.add(protocol)
            asyncio.get_running_loop().call_soon(self._written_through.discard, protocol)
            transport.doWrite()


# The ASGI extension through which an application writes a streaming response's body chunks without a `send()`
# message each (scope["extensions"][BODY_WRITER]["writer"]: a BodyWriter; the application's side is
# streaming/streams/event_stream.py, which names it too: the server imports nothing of the application's).
BODY_WRITER = "sluice.body_writer"


class BodyWriter:
    """One request's body chunks, written by the application itself, between the first chunk and the last (which
    still go through `send()`): `write(chunk)` is what `send({"type": "http.response.body", "body": chunk,
    "more_body": True})` does, without the message, the coroutine and Daphne's dispatch — per token of a paced stream
    (docs/backpressure.md, "Direct writes"). `write` never waits: while `open` is False the client is behind and the
    application waits on `wait()` before writing more, as `send()` would have made it wait."""

    __slots__ = ("_server", "_protocol", "_gate", "_connection", "_transport")

    def __init__(self, server, protocol, gate):
        self._server = server
        self._protocol = protocol
        self._gate = gate
        # Daphne's record of the request (it sets "disconnected" in it) and the connection's TCP transport, found once
        # here rather than for every chunk, as `write_body` finds them for any request.
        self._connection = server.connections.get(protocol)
        transport = getattr(getattr(protocol, "channel", None), "transport", None)
        self._transport = transport if WRITE_THROUGH_UNREGISTERED and isinstance(transport, tcp.Connection) else None

    def write(self, chunk: bytes) -> bool:
        """Write a chunk of a response whose head is sent; False if the connection is gone (nothing written)."""
        transport, protocol, server = self._transport, self._protocol, self._server
        # `write_body`'s conditions for sending the chunk at once (an idle connection of a request still connected),
        # with what was found at the start: the path of every paced token.
        if (transport is not None and not transport._tempDataLen and len(transport.dataBuffer) <= transport.offset
                and self._connection is not None and not self._connection.get("disconnected")
                and protocol not in server._written_through and server._send_chunk(protocol, chunk, transport)):
            return True
        return server.write_body(protocol, chunk)

    @property
    def open(self) -> bool:
        """The client keeps up: more may be written without waiting."""
        return self._gate._open

    async def wait(self):
        await self._gate.wait()


def _set_reason(protocol, status):
    """The status line's reason phrase from the standard library's table: Twisted's lacks some codes (429 among them)
    and writes "Unknown Status" for them. The line is written with the first body bytes, so this still applies."""
    try:
        phrase = HTTPStatus(status).phrase
    except (ValueError, TypeError):  # a code outside the table keeps Twisted's own phrase
        return
    protocol.setResponseCode(status, phrase.encode("ascii"))


WRITE_THROUGH_UNREGISTERED = os.environ.get("SLUICE_WRITE_THROUGH", "1") != "0"  # A/B switch (bench)


def _head_written(protocol):
    """A response whose head has just been written (its first body chunk with it), with more to come: Twisted reads
    neither the request's headers (last: whether the connection persists, decided with the head) nor the response's
    again, and Daphne copied the request's into the scope. Released now rather than kept for as long as the answer
    streams (~2 KB a stream; Request.requestHeaders and responseHeaders, public attributes)."""
    if protocol.startedWriting and not protocol.finished:
        protocol.requestHeaders = Headers()
        protocol.responseHeaders = Headers()


def _not_yet():
    """`startWriting` while a chunk is written through: the reactor is asked to watch the socket afterwards, and only
    if something is left to write."""


def _buffered(transport) -> bool:
    """Whether a Twisted TCP transport holds bytes not yet written to its socket."""
    return bool(transport._tempDataLen or len(transport.dataBuffer) > transport.offset)
