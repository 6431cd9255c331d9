"""The provider's HTTP transport: httpx2's public transport interface over an aiohttp session of ours.

The openai client sends every request through an httpx2 client; this transport hands the request to aiohttp, whose
C HTTP parser reads an event for a fraction of the CPU of httpx2's pure-Python stack. It replaces the SDK's vendored
aiohttp transport (`openai._vendor.httpx_aiohttp`, not public API) and differs from it in one way that matters on
every event of every stream: the response's body reader is handed to the relay (`body_reader`), which reads what
has arrived with one call, instead of through five async-iterator layers (the vendored stream's `iter_chunked`,
httpx2's bound stream, `aiter_raw`, `aiter_bytes` and its chunker): docs/performance.md, "Paced tokens".
"""

import contextlib

import aiohttp
import httpx2

from .wire import WirePool

# aiohttp's exceptions as httpx2's, for the openai client (which reports httpx2's as APIConnectionError and
# APITimeoutError) and for the relay's own reads: the SDK's vendored transport's table and rule (of the matches, the
# most derived httpx2 class), so that a failure is reported as it was before this module.
_EXCEPTIONS = (
    (aiohttp.ServerTimeoutError, httpx2.TimeoutException),
    (aiohttp.SocketTimeoutError, httpx2.ReadTimeout),
    (aiohttp.ClientConnectionError, httpx2.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx2.ConnectError),
    (aiohttp.ClientPayloadError, httpx2.ReadError),
    (aiohttp.ClientProxyConnectionError, httpx2.ProxyError),
    (aiohttp.ClientHttpProxyError, httpx2.ProxyError),
    (aiohttp.NonHttpUrlClientError, httpx2.UnsupportedProtocol),
    (aiohttp.InvalidUrlClientError, httpx2.UnsupportedProtocol),
)


def _mapped(exc: Exception):
    mapped = None
    for from_, to in _EXCEPTIONS:
        if isinstance(exc, from_) and (mapped is None or issubclass(to, mapped)):
            mapped = to
    return mapped


@contextlib.contextmanager
def mapped_errors():
    try:
        yield
    except Exception as exc:
        mapped = _mapped(exc)
        if mapped is None:
            raise
        raise mapped(str(exc)) from exc


class BodyReader:
    """A streamed response's body as aiohttp reads it: `read()` returns what has arrived (at least one byte), or
    b"" at the body's end."""

    __slots__ = ("_content", "_response")

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self._content = response.content

    async def read(self) -> bytes:
        try:  # not `with mapped_errors()`: a context manager's cost on every event
            return await self._content.readany()
        except Exception as exc:
            mapped = _mapped(exc)
            if mapped is None:
                raise
            raise mapped(str(exc)) from exc

    async def aclose(self):
        with mapped_errors():
            await self._response.__aexit__(None, None, None)


class _Body(httpx2.AsyncByteStream):
    """The body as httpx2 reads it (a non-streamed request's `.content`, a provider's error body)."""

    def __init__(self, reader: BodyReader):
        self._reader = reader

    async def __aiter__(self):
        while piece := await self._reader.read():
            yield piece

    async def aclose(self):
        await self._reader.aclose()


def body_reader(response: httpx2.Response) -> BodyReader | None:
    """The body reader of a response this transport made, if its body is sent as is (no content-encoding, which
    httpx2 would decode); None otherwise (read through httpx2)."""
    reader = response.extensions.get("sluice_body_reader")
    if reader is None or response.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        return None
    return reader


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """`session_factory()` builds the aiohttp session on the first request, inside the running loop; `proxy`: the
    proxy every request goes through (None: none); `wire_factory()`, if given, builds the pool of Sluice's own
    HTTP/1.1 client (wire.py) that carries the requests with no read timeout — the streams, whose silences the
    relay's watchdog bounds instead — unless they go through a proxy."""

    def __init__(self, session_factory, proxy: str | None = None, wire_factory=None):
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._proxy = proxy
        self._wire_factory = wire_factory if proxy is None else None
        self._wire: WirePool | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        if self._wire_factory is not None and timeout.get("read", 0) is None:
            try:
                data = request.content
            except httpx2.RequestNotRead:  # a streamed request body (none of Sluice's streams has one): aiohttp's
                pass
            else:
                return await self._over_wire(request, data, timeout)
        if self._session is None:
            self._session = self._session_factory()
        try:
            data = request.content or None
        except httpx2.RequestNotRead:
            data = request.stream
            request.headers.pop("transfer-encoding", None)  # aiohttp frames the body itself
        with mapped_errors():
            response = await self._session.request(
                request.method, str(request.url), headers=request.headers, data=data, allow_redirects=False,
                # httpx2 decodes a compressed body (a non-streamed answer); a stream's events are read as sent.
                auto_decompress=False, compress=False,
                timeout=aiohttp.ClientTimeout(sock_connect=timeout.get("connect"), sock_read=timeout.get("read"),
                                              connect=timeout.get("pool")),
                server_hostname=request.extensions.get("sni_hostname"), proxy=self._proxy,
            ).__aenter__()
        reader = BodyReader(response)
        extensions = {"http_version": b"HTTP/1.1", "sluice_body_reader": reader}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx2.Response(status_code=response.status, headers=response.raw_headers, stream=_Body(reader),
                               request=request, extensions=extensions)

    async def _over_wire(self, request, data, timeout) -> httpx2.Response:
        if self._wire is None:
            self._wire = self._wire_factory()
        response = await self._wire.request(
            request.method, request.url, request.headers.raw, data, connect_timeout=timeout.get("connect"),
            server_hostname=request.extensions.get("sni_hostname"))
        extensions = {"http_version": b"HTTP/1.1", "sluice_body_reader": response.body}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx2.Response(status_code=response.status, headers=response.headers, stream=_Body(response.body),
                               request=request, extensions=extensions)

    async def aclose(self):
        if self._session is not None:
            await self._session.close()
        if self._wire is not None:
            await self._wire.aclose()
