"""Streamed provider responses over an HTTP/1.1 client of our own: httptools (llhttp) parses, asyncio Protocols carry.

aiohttp hands every piece of a stream to its reader through a StreamReader, a task wake-up per event, and that costs
more CPU per event than the rest of the relay. Here the body is parsed in the connection's `data_received` and each
piece is either pushed to the owner's callback there and then (no task switch: `WireBody.push`) or buffered for
`await read()`. The client does only what the provider streams need: HTTP/1.1, http and https, no proxies (a proxied
request goes through transport.py), connections kept alive for a few seconds per (scheme, host, port, SNI name).
Failures are httpx2's exceptions, as the rest of the provider code expects them.
"""

import asyncio
import ipaddress
import logging
import socket

import aiohappyeyeballs
import httptools
import httpx2

logger = logging.getLogger("streaming.provider")

# How long a host name's addresses are reused before it is resolved again, and how long a connection attempt has
# before the next address is tried as well: aiohttp's defaults (ttl_dns_cache, happy_eyeballs_delay).
DNS_TTL = 10.0
HAPPY_EYEBALLS_DELAY = 0.25


class _Discard(Exception):
    """Raised from a parser callback to stop parsing bytes that belong to no response; the connection is closed."""


class WireResponse:
    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]], body: "WireBody"):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


class WireBody:
    """A response's body, read with `read()` (pull mode, the default) or pushed to callbacks (`push()`).

    It is also the parser's callback object (`on_*`, called by httptools): one parser per response, so nothing of a
    previous response's parse can leak into the next one on a kept-alive connection.
    """

    __slots__ = ("_connection", "_parser", "_head", "_headers_in", "_reason", "_headers", "_interim", "_final",
                 "_answered", "_on_piece", "_on_end", "_pieces", "_buffered", "_read_ahead", "_waiter", "_ended",
                 "_error", "_keep_alive", "_owner_paused", "_ahead_paused", "_closed")

    def __init__(self, connection: "_Connection", read_ahead: int, head: bool):
        self._connection = connection
        self._parser = httptools.HttpResponseParser(self)
        self._head = head  # a HEAD request's response has no body, whatever its headers say
        self._headers_in = connection.loop.create_future()  # the WireResponse, once its headers are in
        self._reason, self._headers = b"", []
        self._interim = self._final = self._answered = False
        self._on_piece = self._on_end = None  # push mode while _on_piece is set
        self._pieces, self._buffered, self._read_ahead = [], 0, read_ahead
        self._waiter = None  # a pending read()'s future
        self._ended, self._error, self._keep_alive = False, None, False
        self._owner_paused = self._ahead_paused = self._closed = False

    # The parser's callbacks.

    def on_message_begin(self):
        if self._final:  # bytes after the response's end: no request asked for them
            raise _Discard
        self._answered = True

    def on_status(self, status: bytes):
        self._reason += status

    def on_header(self, name: bytes, value: bytes):
        self._headers.append((name, value))

    def on_headers_complete(self):
        status = self._parser.get_status_code()
        if status < 200:  # an interim response (100 Continue, 103 Early Hints): the final one follows
            self._interim = True
            return
        self._final = True
        if not self._headers_in.done():
            self._headers_in.set_result(WireResponse(status, self._reason.decode("latin-1"), self._headers, self))
        if self._head:
            # httptools cannot tell llhttp that the request was HEAD, so the parser would wait for the body the
            # headers announce: the body ends here, and the connection is not reused.
            self._finish(None)
            raise _Discard

    def on_body(self, body: bytes):
        on_piece = self._on_piece  # the hot path: one test, one call
        if on_piece is not None:
            on_piece(body)
            return
        self._pieces.append(body)
        self._buffered += len(body)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._buffered > self._read_ahead and not self._ahead_paused:
            self._ahead_paused = True
            if not self._owner_paused:
                self._connection.pause_reading()

    def on_message_complete(self):
        if self._interim:
            self._interim, self._reason, self._headers = False, b"", []
            return
        self._keep_alive = self._parser.should_keep_alive()  # False if the server said "Connection: close"
        self._finish(None)

    # The end, clean or failed.

    def _finish(self, error: Exception | None):
        self._ended, self._error = True, error
        if error is not None:
            self._keep_alive = False
            self._connection.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        on_end = self._on_end
        if on_end is not None:
            self._on_piece = self._on_end = None
            try:
                on_end(error)
            except Exception:
                logger.exception("A provider stream's end callback failed; its connection is closed.")
                self._keep_alive = False
                self._connection.close()

    def _fail(self, message: str):
        """The parse failed (a malformed response, or a callback raised): the connection cannot be used further."""
        self._answered = True
        self._connection.close()
        if not self._final:
            if not self._headers_in.done():
                self._headers_in.set_exception(httpx2.RemoteProtocolError(message))
        elif not self._ended:
            self._finish(httpx2.ReadError(message))

    def _lost(self, exc: Exception | None):
        if self._ended:
            return
        if not self._final:
            if not self._headers_in.done():
                self._headers_in.set_exception(httpx2.RemoteProtocolError(
                    "The connection closed before the response's status line and headers."))
        elif exc is None and self._close_delimited():
            self._finish(None)  # the body was delimited by the connection's close: this is its end
        else:
            self._finish(httpx2.ReadError("The connection was lost before the response body's end."))

    def _close_delimited(self) -> bool:
        # Only asked at the connection's EOF, so the headers are not scanned for every response.
        for name, value in self._headers:
            name = name.lower()
            if name == b"content-length" or (
                    name == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")):
                return False
        return True

    # The owner's interface.

    async def read(self) -> bytes:
        """The body bytes that have arrived (at least one), waiting if none; b"" at the body's end."""
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._buffered = 0
                if self._ahead_paused:
                    self._ahead_paused = False
                    if not self._owner_paused:
                        self._connection.resume_reading()
                return data
            if self._ended:
                if self._error is not None:
                    raise httpx2.ReadError(str(self._error)) from self._error
                return b""
            if self._on_piece is not None or self._waiter is not None:
                raise RuntimeError("The body is pushed to callbacks, or another read() is pending.")
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def push(self, on_piece, on_end) -> bool:
        """From now on, pass each piece to `on_piece(piece)` from `data_received`, and the end to `on_end(None)` or
        `on_end(httpx2.ReadError)`, once. False (nothing changed) if bytes wait unread, the body has ended, or a read()
        is pending. If either callback raises, the exception is logged and the body fails: a raising `on_piece` is
        followed by `on_end(ReadError)`; a raising `on_end` is not called again."""
        if self._pieces or self._ended or self._waiter is not None or self._closed:
            return False
        self._on_piece, self._on_end = on_piece, on_end
        return True

    def pull(self) -> None:
        """Leave push mode: later pieces, even the rest of the current socket read, are buffered for read()."""
        self._on_piece = self._on_end = None

    def pause(self) -> None:
        """Stop reading the socket. Pieces of a socket read already made are still delivered."""
        if not self._owner_paused and not self._closed:
            self._owner_paused = True
            if not self._ahead_paused:
                self._connection.pause_reading()

    def resume(self) -> None:
        if self._owner_paused and not self._closed:
            self._owner_paused = False
            if not self._ahead_paused:
                self._connection.resume_reading()

    @property
    def ended(self) -> bool:
        """The body's end (clean or failed) has been seen; in pull mode, bytes may still wait for read()."""
        return self._ended

    async def aclose(self) -> None:
        """Return the connection to its pool if the body was all delivered and the server keeps it alive; otherwise
        close it (the provider sees the close and stops generating)."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if self._ended and self._error is None and self._keep_alive and not self._pieces:
            connection.release()
        else:
            if not self._ended:
                self._on_piece = self._on_end = None  # the owner asked for the end: no callback for it
                self._finish(httpx2.ReadError("The response body was closed before its end."))
            connection.close()
        # Nothing feeds this parser again (the connection was released, or closed and reads no more). It holds bound
        # methods of this body: a reference cycle that kept the body, its future and its response alive until the
        # cyclic collector came round (docs/performance.md, "Session 13").
        self._parser = None


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "WirePool", key: tuple, loop: asyncio.AbstractEventLoop):
        self.pool, self.key, self.loop = pool, key, loop
        self.transport = None
        self.body: WireBody | None = None  # the response being read
        self.feed = None  # its parser's feed_data
        self.lost = False
        self.idle_since = 0.0
        self.expiry = None  # the idle timer's handle, while in the pool

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        feed = self.feed
        if feed is None:  # bytes on an idle connection: no request asked for them
            self.close()
            return
        try:
            feed(data)
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__ or exc
            if not isinstance(error, _Discard):
                # An owner's callback raised (or a bug of ours): logged, never lost, and the body fails.
                logger.exception("A provider stream's callback failed; the stream ends.", exc_info=error)
            self.body._fail(f"The response body failed: {error!r}.")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.body._fail(f"The provider's response is malformed: {exc!r}.")

    def connection_lost(self, exc: Exception | None):
        self.lost = True
        self.pool._forget(self)
        body, self.body, self.feed = self.body, None, None  # (the body refers to this connection: no cycle left)
        if body is not None:
            body._lost(exc)

    def pause_reading(self):
        if not self.lost and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self):
        if not self.lost and not self.transport.is_closing():
            self.transport.resume_reading()

    def release(self):
        self.body = self.feed = None
        self.resume_reading()  # the body may have ended paused; an idle connection must see the server's close
        self.pool._keep(self)

    def close(self):
        self.pool._forget(self)
        if self.transport is not None and not self.lost:
            self.transport.close()


class WirePool:
    """Connections to providers, kept alive between requests, per (scheme, host, port, server_hostname)."""

    def __init__(self, *, ssl_context=None, receive_buffer: int = 32 * 1024, read_ahead: int = 32 * 1024,
                 keepalive: float = 5.0):
        self._ssl_context = ssl_context  # made on the first https request if None
        self._receive_buffer = receive_buffer  # SO_RCVBUF, set before connecting (client.py says why)
        self._read_ahead = read_ahead
        self._keepalive = keepalive
        self._idle: dict[tuple, list[_Connection]] = {}
        self._resolved: dict[tuple, tuple] = {}  # (host, port) -> (until when, getaddrinfo's answer)

    async def request(self, method: str, url: httpx2.URL, headers: list[tuple[bytes, bytes]], body: bytes, *,
                      connect_timeout: float | None = None, server_hostname: str | None = None) -> WireResponse:
        """Send the request (the headers as given: the caller includes Host and Content-Length) and return once the
        final response's status line and headers are in."""
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"The scheme {scheme!r} is not supported.")
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80), server_hostname)
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), url.raw_path)]
        lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
        lines += (b"\r\n", body)
        message = b"".join(lines)
        head = method.upper() == "HEAD"
        connection = self._idle_connection(key)
        if connection is not None:
            wire_body = WireBody(connection, self._read_ahead, head)
            try:
                return await self._exchange(connection, wire_body, message)
            except (httpx2.RemoteProtocolError, httpx2.WriteError):
                if wire_body._answered:
                    raise
                # The server closed the idle connection as the request went out: it processed nothing, so the
                # request is sent again, once, on a new connection.
        connection = await self._connect(key, connect_timeout)
        return await self._exchange(connection, WireBody(connection, self._read_ahead, head), message)

    async def aclose(self) -> None:
        """Close the idle connections. The pool stays usable: later requests open new ones."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    async def _exchange(self, connection: _Connection, body: WireBody, message: bytes) -> WireResponse:
        connection.body, connection.feed = body, body._parser.feed_data
        try:
            connection.transport.write(message)  # one write: request line, headers and body
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError on a closed transport
            connection.close()
            raise httpx2.WriteError(f"Could not send the request: {exc!r}.") from exc
        try:
            response = await body._headers_in
        except BaseException:  # an error, or the caller cancelled: the connection's state is unknown
            connection.close()
            raise
        # The future's result (the response) refers to the body: a cycle that outlived the stream until the cyclic
        # collector came round. Nothing waits on it again (only the final headers set it; _fail and _lost look at it
        # only before them).
        body._headers_in = None
        return response

    async def _connect(self, key: tuple, timeout: float | None) -> _Connection:
        scheme, host, port, server_hostname = key
        loop = asyncio.get_running_loop()
        ssl_context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()
            ssl_context = self._ssl_context
        connection = _Connection(self, key, loop)
        try:
            async with asyncio.timeout(timeout):
                sock = await self._socket(loop, host, port)
                # The loop owns the socket from here: it closes it if the connection (or the TLS handshake) fails.
                await loop.create_connection(lambda: connection, sock=sock, ssl=ssl_context,
                                             server_hostname=(server_hostname or host) if ssl_context else None)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise httpx2.ConnectTimeout(f"Connecting to {host}:{port} timed out.") from exc
        except OSError as exc:  # refused, unknown host, TLS failure (ssl.SSLError is an OSError)
            raise httpx2.ConnectError(f"Could not connect to {host}:{port}: {exc}") from exc
        return connection

    async def _socket(self, loop, host: str, port: int) -> socket.socket:
        """A connected socket, its receive buffer set before connecting (it bounds the TCP window it advertises), by
        aiohappyeyeballs as aiohttp connects (RFC 8305: the next address tried 0.25 s after the last, so that a host
        whose IPv6 route is broken still connects over IPv4), to addresses resolved at most once per DNS_TTL."""
        addresses = await self._addresses(loop, host, port)

        def new_socket(address_info):
            family, type_, proto, _, _ = address_info
            sock = socket.socket(family, type_, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
            return sock

        return await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                                                       loop=loop, socket_factory=new_socket)

    async def _addresses(self, loop, host: str, port: int) -> list:
        try:  # an address already (a local provider, the simulator): nothing to resolve
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        now = loop.time()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not addresses:
            raise OSError(f"No address found for {host}.")
        self._resolved[(host, port)] = (now + DNS_TTL, addresses)
        return addresses

    def _idle_connection(self, key: tuple) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()  # the most recently used: the likeliest to be still open
            connection.expiry.cancel()
            connection.expiry = None
            if (not connection.lost and not connection.transport.is_closing()
                    and connection.loop.time() - connection.idle_since < self._keepalive):
                return connection
            connection.close()
        return None

    def _keep(self, connection: _Connection):
        connection.idle_since = connection.loop.time()
        connection.expiry = connection.loop.call_later(self._keepalive, connection.close)
        self._idle.setdefault(connection.key, []).append(connection)

    def _forget(self, connection: _Connection):
        """Drop a connection from the idle ones (closed by either side, or expired)."""
        if connection.expiry is not None:
            connection.expiry.cancel()
            connection.expiry = None
            connections = self._idle.get(connection.key)
            if connections and connection in connections:
                connections.remove(connection)
