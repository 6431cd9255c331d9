"""What the server decides before a request's body is read: its size, and (under keyed paths) that a key is sent.

Twisted reads a whole request body before Daphne starts the application — into memory, or a temporary file past
100 kB — so without this a 100 MB body was read in full, and spooled to disk, before the application could answer
401 or 413 (issue 15, finding 5). `BoundedRequest` answers as soon as the headers are in:

- a body declared (Content-Length) larger than the limit: 413 at once, nothing of it read;
- a chunked body: counted as it arrives, 413 as soon as it passes the limit, nothing kept past it;
- a request under a keyed path (settings.SERVER_KEYED_PATH_PREFIXES, `/v1/` for Sluice) with a body and no
  `Authorization: Bearer` credentials: 401 at once. A key that is sent is checked by the application, which
  receives at most the limit (config/asgi.py's intake checks it before reading the body under Uvicorn).

The limit is Django's DATA_UPLOAD_MAX_MEMORY_SIZE (the most any request body may be; the API's own, smaller
SLUICE_MAX_BODY_BYTES is the application's), or MAX_BODY_BYTES when the server runs an application without Django
settings. The refusal is written straight to the socket (the request is not finished through Twisted: the channel
is still reading its headers), the write side is closed, and what the client still sends is discarded for up to
LINGER_SECONDS so that it reads the answer instead of a reset.

Server-level errors Daphne writes itself (a header it refuses, a path that is not ASCII) are OpenAI error JSON here
too, rather than Daphne's HTML page: `json_error`.
"""

import json
import time
import uuid
import weakref
from http import HTTPStatus

from daphne.http_protocol import HTTPFactory, WebRequest
from twisted.internet import reactor

MAX_BODY_BYTES = 2_621_440  # Django's default DATA_UPLOAD_MAX_MEMORY_SIZE
LINGER_SECONDS = 2.0
# How long a request's body may take to arrive once its headers are in (settings.SERVER_BODY_TIMEOUT): a client that
# announces a length it never sends, or trickles a byte now and then (Twisted's own timeout is on idleness, 60 s,
# and any byte resets it), gets 408 instead of holding a connection and its buffer for ever.
BODY_TIMEOUT_SECONDS = 30.0

_MISSING_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."


def _settings():
    """(max body bytes or None, keyed path prefixes, body timeout) from Django's settings when the application has
    them."""
    from django.conf import settings

    if not settings.configured:
        return MAX_BODY_BYTES, (), BODY_TIMEOUT_SECONDS
    return (settings.DATA_UPLOAD_MAX_MEMORY_SIZE, tuple(getattr(settings, "SERVER_KEYED_PATH_PREFIXES", ())),
            getattr(settings, "SERVER_BODY_TIMEOUT", BODY_TIMEOUT_SECONDS))


def json_error(status: int, message: str, code: str, type_: str = "invalid_request_error", head=False) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI error object, closing the connection (no body for HEAD)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    phrase = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: req_{uuid.uuid4().hex}\r\nConnection: close\r\n\r\n").encode("ascii") + (
        b"" if head else body)


def _is_head(channel) -> bool:
    # The request line's method, as the channel parsed it (private, like _path: docs/architecture.md).
    return getattr(channel, "_command", b"") == b"HEAD"


class BoundedRequest(WebRequest):
    """Daphne's request, refusing an oversized or unauthenticated body before reading it."""

    _refused = False
    _received = 0
    _limit = None
    _body_deadline = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        started = getattr(self.channel.factory, "request_started", None)
        if started is not None:
            started(self.channel)

    def gotLength(self, length):
        limit, keyed_prefixes, body_timeout = _settings()
        self._limit = limit
        # The request target, as the channel parsed it from the request line (the Request learns it only once the
        # body is in: requestReceived). A private attribute of Twisted's HTTPChannel: docs/architecture.md.
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        if path.startswith((b"http://", b"https://")):  # absolute form: config/asgi.py routes by its path
            path = b"/" + path.split(b"/", 3)[-1]
        has_body = length is None or length > 0
        if has_body and keyed_prefixes and path.decode("latin-1").startswith(keyed_prefixes) \
                and not _bearer(self.requestHeaders.getRawHeaders(b"Authorization") or []):
            return self._refuse(json_error(401, _MISSING_KEY, "invalid_api_key", head=_is_head(self.channel)))
        if limit is not None and length is not None and length > limit:
            return self._refuse(_too_large(limit, _is_head(self.channel)))
        if has_body and body_timeout:
            self._body_deadline = reactor.callLater(body_timeout, self._body_too_slow, body_timeout)
        super().gotLength(length)

    def _body_too_slow(self, body_timeout):
        self._body_deadline = None
        if not self._refused:
            self._refuse(json_error(408, f"The request body did not arrive within {body_timeout:g} s.",
                                    "request_timeout", head=_is_head(self.channel)))

    def handleContentChunk(self, data):
        if self._refused:
            return  # discarded: the answer is sent and the connection is closing
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            return self._refuse(_too_large(self._limit, _is_head(self.channel)))
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        self._cancel_deadline()
        if not self._refused:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason):
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self):
        if self._body_deadline is not None:
            if self._body_deadline.active():
                self._body_deadline.cancel()
            self._body_deadline = None

    def _refuse(self, response: bytes):
        self._refused = True
        self._cancel_deadline()
        content = getattr(self, "content", None)
        if content is not None:
            content.close()  # what was read of a chunked body: dropped (a temporary file is deleted)
        self.content = None
        # No "100 Continue" after the answer (HTTPChannel sends it after gotLength when the client asked).
        self.requestHeaders.removeHeader(b"Expect")
        self.channel.persistent = False
        transport = self.channel.transport
        transport.write(response)
        transport.loseWriteConnection()
        reactor.callLater(LINGER_SECONDS, _abort, transport)

    def basic_error(self, status, status_text, body):
        # Daphne's own refusals (an invalid header, a non-ASCII path): JSON, not its HTML page.
        # Daphne's own 500 ("Exception inside application") comes this way too: a server error, not the client's.
        kind, code = ("server_error", "internal_error") if status >= 500 else ("invalid_request_error", "bad_request")
        payload = json.dumps({"error": {"message": body.rstrip(".") + ".", "type": kind, "param": None,
                                        "code": code}}).encode()
        if self.method == b"HEAD":
            payload = b""
        self.handle_reply({"type": "http.response.start", "status": status,
                           "headers": [(b"Content-Type", b"application/json"),
                                       (b"x-request-id", f"req_{uuid.uuid4().hex}".encode())]})
        self.handle_reply({"type": "http.response.body", "body": payload})


def _bearer(values) -> bool:
    return any(v[:7].lower() == b"bearer " and v[7:].strip() for v in values)


def _too_large(limit, head=False):
    return json_error(413, f"Request body is larger than {limit} bytes.", "request_too_large", head=head)


def _abort(transport):
    if transport.connected:
        transport.abortConnection()


class BoundedHTTPFactory(HTTPFactory):
    """Daphne's HTTPFactory, building BoundedRequests, whose channels refuse what is not HTTP with JSON.

    It also remembers the connections whose first request has not begun (`awaiting_request`): Daphne learns of a
    request only at its request line, and the drain (shutdown.py) must not drop a connection accepted just before it.
    """

    def __init__(self, server):
        super().__init__(server)
        self._unrequested = weakref.WeakKeyDictionary()  # HTTPChannel -> when accepted (monotonic), until a request

    def request_started(self, channel):
        self._unrequested.pop(channel, None)

    def awaiting_request(self, accepted_since: float) -> list:
        """The open connections accepted at or after `accepted_since` (time.monotonic()) with no request begun."""
        return [channel for channel, accepted in list(self._unrequested.items())
                if accepted >= accepted_since and getattr(channel.transport, "connected", False)]

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.requestFactory = BoundedRequest
            # Twisted answers a request line or header it cannot parse (a path that is not ASCII, a NUL in a header,
            # a malformed chunk) with a bare "400 Bad Request" and no body, through one method of HTTPChannel; the
            # channel sits inside the protocol-negotiating wrapper. Both names are private: docs/architecture.md.
            channel = getattr(protocol, "_channel", None)
            if channel is not None:
                self._unrequested[channel] = time.monotonic()
            if channel is not None and hasattr(channel, "_respondToBadRequestAndDisconnect"):
                # Through a weak reference: a closure holding the channel, set on the channel, made every connection
                # a reference cycle, freed only by the cyclic collector with everything hanging off it (its requests,
                # their gates, the application's objects) long after the connection closed.
                ref = weakref.ref(channel)
                channel._respondToBadRequestAndDisconnect = lambda: _not_http(ref())
                # A request line or header line over HTTPChannel.MAX_LENGTH (16 KiB): LineReceiver's public hook,
                # which by default closes the connection without a word.
                channel.lineLengthExceeded = lambda line: _line_too_long(ref())
        return protocol


def _not_http(channel):
    channel.transport.write(json_error(400, "The request could not be parsed as HTTP/1.1.", "bad_request",
                                       head=_is_head(channel)))
    channel.loseConnection()


def _line_too_long(channel):
    # Before the request line is complete the method is unknown: the body goes out (a HEAD request's line this long
    # is not HTTP a client can expect an exact answer to).
    channel.transport.write(json_error(431, f"A request line or header is longer than {channel.MAX_LENGTH} bytes.",
                                       "request_header_too_large", head=_is_head(channel)))
    channel.transport.loseConnection()
