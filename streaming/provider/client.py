"""The upstream provider: the only module that imports `openai`.

One shared `AsyncOpenAI` client per process and base URL (its connection pool is reused), pointed
at OpenAI, any compatible server (vLLM, Ollama, a gateway), or Sluice's own simulated upstream.
Streams are read as raw server-sent events through the client's streaming response, so chunks
reach the client as the provider wrote them, without a parse-and-reserialise round trip.
"""

import asyncio
import email.utils
import re
import socket
import time
import urllib.parse
import urllib.request
import weakref

import aiohttp
import httpx2
import openai
from django.conf import settings
from .endpoints import CHAT, Endpoint
from .errors import UpstreamError
from .events import Event, SSEParser
from .targets import Target, token_limit_field  # noqa: F401 (token_limit_field: its home before targets.py)
from .transport import AiohttpTransport, body_reader
from .wire import WireBody, WirePool

SIMULATOR_PREFIX = "/_sim"
# One client per event loop (its aiohttp session belongs to the loop it was made on), base URL and timeouts.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()


def uses_simulator() -> bool:
    return not settings.OPENAI_API_KEY and not settings.OPENAI_BASE_URL


def provider_url(scope) -> str:
    """The configured provider, or this process's own simulated upstream (reached over loopback)."""
    if settings.OPENAI_BASE_URL:
        return settings.OPENAI_BASE_URL
    if settings.OPENAI_API_KEY:
        return "https://api.openai.com/v1"
    host, port = (scope.get("server") or ("127.0.0.1", 8000))[:2]
    if host in ("0.0.0.0", "::", "", None):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{SIMULATOR_PREFIX}/v1"


# How far one provider connection reads ahead of the relay (a stream paused by a slow client keeps this much).
# aiohttp pauses a connection's socket once its StreamReader holds more than twice read_bufsize (256 KiB by
# default in aiohttp 3.14: 512 KiB), and only after handling a whole socket read; asyncio reads up to 256 KiB at
# a time from a kernel buffer that autotunes up to tcp_rmem's max. Measured: 30 paused streams held ~520 KiB each
# in aiohttp. A 16 KiB read_bufsize pauses above 32 KiB; a 32 KiB SO_RCVBUF, set before connecting, bounds each
# socket read and what the kernel keeps for a paused stream. At a 100 ms round trip that window still carries
# ~300 KB/s per stream, far above a model's output.
UPSTREAM_READ_BUFFER_BYTES = 16 * 1024
UPSTREAM_RECEIVE_BUFFER_BYTES = 32 * 1024


def _upstream_socket(addr_info) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RECEIVE_BUFFER_BYTES)
    return sock


def _aiohttp_session() -> aiohttp.ClientSession:
    # The session the SDK's own aiohttp transport would build (its TLS context, 5 s keep-alive), with the read-ahead
    # bounds above and no connection limit (aiohttp's default is 100). Called by the transport on its first request,
    # inside the running loop.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=5.0, ssl=httpx2.create_ssl_context(),
                                     socket_factory=_upstream_socket)
    # Not trust_env: aiohttp would then look for a ~/.netrc on every request, in a thread. The proxy the environment
    # names is resolved once per client instead (_environment_proxy).
    return aiohttp.ClientSession(connector=connector, read_bufsize=UPSTREAM_READ_BUFFER_BYTES)


def _wire_pool() -> WirePool:
    # The streams' own client (wire.py): the same TLS context, keep-alive and bounds as the aiohttp session's.
    return WirePool(ssl_context=httpx2.create_ssl_context(), receive_buffer=UPSTREAM_RECEIVE_BUFFER_BYTES,
                    read_ahead=2 * UPSTREAM_READ_BUFFER_BYTES, keepalive=5.0)


def _environment_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY names for `url`, unless NO_PROXY exempts its host (what httpx2's trust_env did)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def get_client(target: Target) -> openai.AsyncOpenAI:
    connect = target.connect_timeout or settings.UPSTREAM_CONNECT_TIMEOUT
    timeouts = (connect, settings.UPSTREAM_IDLE_TIMEOUT)
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get((target.url, target.api_key, timeouts))
    if client is None:
        client = clients[(target.url, target.api_key, timeouts)] = openai.AsyncOpenAI(
            api_key=target.api_key or "sluice-simulator",
            base_url=target.url,
            # Sluice retries itself, before the first byte only (docs/resilience.md).
            max_retries=0,
            default_headers=WITHOUT_SDK_TELEMETRY,
            # The read timeout is the longest silence allowed between two chunks.
            timeout=httpx2.Timeout(settings.UPSTREAM_IDLE_TIMEOUT, connect=connect),
            # The SDK's client defaults over an aiohttp transport (transport.py): its C HTTP parser reads an event
            # for a fraction of the CPU of the default transport's pure-Python stack, on every event of every
            # stream, and the relay reads its body directly (docs/performance.md).
            http_client=openai.DefaultAsyncHttpxClient(
                transport=AiohttpTransport(_aiohttp_session, proxy=_environment_proxy(target.url),
                                           wire_factory=_wire_pool if settings.UPSTREAM_STREAMS_OVER_WIRE else None),
                trust_env=False,
                timeout=httpx2.Timeout(settings.UPSTREAM_IDLE_TIMEOUT, connect=connect),
            ),
        )
    return client


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


# What a provider's message may carry that must not reach a client: URLs (its address, an organisation's) and keys.
_SECRETS = re.compile(r"(?i)\b(?:https?|wss?)://\S+|\b(?:sk|pk|rk|key|org|proj)-[A-Za-z0-9_\-*.]{6,}|\bBearer\s+\S+")
MAX_PROVIDER_MESSAGE = 500


def scrub(text: str) -> str:
    """A provider's message with URLs, keys and bearer tokens replaced, and its length bounded."""
    return _SECRETS.sub("[redacted]", text)[:MAX_PROVIDER_MESSAGE]


def _rejected(status, body) -> UpstreamError:
    """A provider's own client error (a field it does not accept, a value out of its range): the client sees the
    provider's message and `param`, scrubbed, with a 4xx, as if it had called the provider itself."""
    message = param = None
    if isinstance(body, dict):
        message, param = body.get("message"), body.get("param")
    elif isinstance(body, str):
        message = body
    text = f"The upstream provider rejected the request (HTTP {status})"
    if isinstance(message, str) and message.strip():
        text += ": " + scrub(message.strip())
    return UpstreamError(status if 400 <= status < 500 else 400, "upstream_rejected",
                         text if text.endswith(".") else text + ".",
                         param=scrub(param) if isinstance(param, str) else None)


def _connect_failed(exc) -> bool:
    """A connection refused (or no route, an unknown host): the SDK's aiohttp transport reports it as httpx's
    ConnectTimeout, and the SDK as APITimeoutError, but nothing timed out (docs/resilience.md: upstream_unreachable)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, aiohttp.ClientConnectorError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _translate(exc: Exception) -> UpstreamError:
    # Messages are ours, except a provider's own client error (below), whose message is scrubbed: a provider's text
    # may name its URL, organisation or key prefix.
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
        retry_after = _retry_after(exc.response.headers if exc.response is not None else None)
        if status == 429 and code == "insufficient_quota":
            return UpstreamError(503, "upstream_quota", "The upstream provider's account is out of quota.")
        if status == 429:
            return UpstreamError(429, "upstream_rate_limited", "The upstream provider is rate limiting requests.",
                                 retry_after, retryable=True)
        if status >= 500:
            return UpstreamError(502, "upstream_error", f"The upstream provider failed (HTTP {status}).",
                                 retry_after, retryable=True)
        if status in (401, 403):
            return UpstreamError(502, "upstream_auth", "The gateway's upstream credentials were refused.")
        if status == 404:
            return UpstreamError(404, "model_not_found", "The upstream provider does not serve this model.")
        return _rejected(status, exc.body)
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException)) and not _connect_failed(exc):
        return UpstreamError(504, "upstream_timeout", "The upstream provider did not answer in time.", retryable=True)
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError, OSError)):
        return UpstreamError(502, "upstream_unreachable", "Could not reach the upstream provider.", retryable=True)
    return UpstreamError(502, "upstream_error", "The upstream provider failed.")


class EventStream:
    """An open upstream stream, read as batches: the classified events (events.py) each read completed.

    A batch per network read, not an event at a time: when the provider is ahead (or a client is slow), the
    events of one read travel through the relay together, as one write (docs/performance.md).
    """

    def __init__(self, response: httpx2.Response, classify=CHAT.classify):
        self._pieces = None
        # The body read directly, if the transport is ours (transport.py). Then the httpx2 response (its request,
        # both header lists, the request's JSON body: ~7 KB a stream) is not kept for the stream's life.
        self._reader = body_reader(response)
        self._response = response if self._reader is None else None
        self._parser = SSEParser()
        self._classify = classify  # the endpoint's (endpoints.py)
        self.closed = False

    async def read_batch(self) -> list[Event] | None:
        """The events the next read(s) completed (at least one), or None at the body's end."""
        reader = self._reader
        if reader is None and self._pieces is None:
            self._pieces = aiter(self._response.aiter_bytes())
        while True:
            try:
                if reader is not None:
                    piece = await reader.read()
                    if not piece:
                        return None
                else:
                    piece = await anext(self._pieces)
            except StopAsyncIteration:
                return None
            except (httpx2.HTTPError, OSError) as exc:
                raise _translate(exc) from exc
            payloads = self._parser.feed(piece)
            if payloads:
                classify = self._classify
                return [classify(data) for data in payloads]

    def push(self, on_batch) -> bool:
        """Hand the body's events to `on_batch` as they arrive, from the provider connection's own callback (no task
        wakes up per event): `on_batch(events)` for each read that completed any, then `on_batch(None)` at the body's
        end or `on_batch(error)` (an UpstreamError) if it broke off. `on_batch` returns False to stop: the body's
        bytes then wait for `read_batch()` again. False (nothing changes) if the body is not read by Sluice's own
        HTTP client (streaming/provider/wire.py), has ended, or has bytes waiting to be read; the caller reads on.
        """
        reader = self._reader
        if reader is None or not isinstance(reader, WireBody):
            return False
        parser, classify = self._parser, self._classify

        def on_piece(piece):
            try:
                payloads = parser.feed(piece)
                if not payloads or on_batch([classify(data) for data in payloads]):
                    return
            except Exception as exc:  # what a read would have raised (a payload nested past the JSON parser's depth)
                on_batch(exc)
            reader.pull()

        def on_end(exc):
            on_batch(None if exc is None else _translate(exc))

        return reader.push(on_piece, on_end)

    async def aclose(self):
        """Close the connection: the provider sees it and stops generating."""
        if not self.closed:
            self.closed = True
            # A read still pending in a cancelled task unwinds by itself; a suspended iterator is closed here.
            if self._pieces is not None and not getattr(self._pieces, "ag_running", False):
                await self._pieces.aclose()
            if self._reader is not None:
                await self._reader.aclose()
            else:
                await self._response.aclose()


# The SDK's own headers on every request — its version, this host's OS, architecture and Python, the retry count and
# the read timeout (X-Stainless-*) — left out: they tell a provider nothing it needs about the request, and describe
# Sluice's host to every provider it calls (User-Agent still names the SDK). Their building cost ~20–30 µs a request
# (docs/performance.md, "Session 14").
SDK_TELEMETRY = ("X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch",
                 "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Async")
WITHOUT_SDK_TELEMETRY = {name: openai.Omit() for name in SDK_TELEMETRY}
# The two the SDK adds per request unless the request's own headers name them.
_PER_REQUEST_TELEMETRY = {"x-stainless-retry-count": openai.Omit(), "x-stainless-read-timeout": openai.Omit()}


async def _post(target: Target, body: dict, request_id: str, stream: bool, path: str) -> httpx2.Response:
    options = {"headers": {"X-Client-Request-Id": request_id, **_PER_REQUEST_TELEMETRY}}
    if stream:
        # No read timeout on the socket for a stream: it would arm and cancel a timer on every event of every
        # stream. The first-token deadline (first_token.py) and the relay's watchdog, which ends
        # a stream silent for UPSTREAM_IDLE_TIMEOUT (streaming/streams/watchdog.py), bound the waits instead.
        options["timeout"] = httpx2.Timeout(None, connect=target.connect_timeout or settings.UPSTREAM_CONNECT_TIMEOUT)
    # The client's own request path (base URL, auth, headers, status errors), without the typed `create()`
    # wrapper: its parameter transformation costs more than the whole relay of a short answer
    # (docs/performance.md). The body was validated by Sluice already (streaming/gateway/validation.py).
    try:
        client = get_client(target)
        # An absolute URL: the SDK would otherwise parse the path and merge it with its base URL on every request
        # (~35–55 µs); the base URL it keeps ends with "/" and the endpoints' paths start with one.
        return await client.post(f"{client.base_url}{path[1:]}", cast_to=httpx2.Response, body=body, stream=stream,
                                 options=options)
    except Exception as exc:
        raise _translate(exc) from exc


async def open_stream(target: Target, body: dict, request_id: str, endpoint: Endpoint = CHAT) -> EventStream:
    """Send a streaming request (a chat completion unless `endpoint` says otherwise); returns once the provider
    answered with its headers."""
    return EventStream(await _post(target, body, request_id, True, endpoint.path), endpoint.classify)


async def complete(target: Target, body: dict, request_id: str, endpoint: Endpoint = CHAT) -> bytes:
    """A non-streaming request (a chat completion unless `endpoint` says otherwise): the provider's JSON, as it sent
    it."""
    return (await _post(target, body, request_id, False, endpoint.path)).content


async def list_models(target: Target) -> list[str]:
    """The provider's model ids (GET /models): the admin's connection test. Failures as UpstreamError, like a
    completion's (no provider text, no address, no key)."""
    try:
        page = await get_client(target).models.list()
    except Exception as exc:
        raise _translate(exc) from exc
    return [model.id for model in page.data if isinstance(getattr(model, "id", None), str)]


async def close_clients():
    """Close this event loop's provider clients and their connection pools (a server shutting down, tests)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()
