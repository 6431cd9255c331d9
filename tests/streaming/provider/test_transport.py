"""streaming/provider/transport.py: the openai client's requests over aiohttp, and a stream's body read directly by
the relay (issue 20), against a real HTTP server on loopback (aiohttp's own web server, not Sluice's simulator).

The direct read must give what httpx2's layers gave: the same events for a plain body, a compressed body still
decoded (read through httpx2), and a provider that dies mid-body reported as the same UpstreamError as before.
"""

import asyncio
import gc
import gzip
import socket

import httpx2

import pytest
from aiohttp import web

from streaming.provider import client
from streaming.provider.errors import UpstreamError
from streaming.provider.targets import Target

EVENTS = [b'{"choices":[{"index":0,"delta":{"content":"tok%d"}}]}' % n for n in range(50)]
BODY = b"".join(b"data: " + e + b"\n\n" for e in EVENTS) + b"data: [DONE]\n\n"


async def _plain(request):
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for n in range(0, len(BODY), 37):  # pieces that split events anywhere
        await response.write(BODY[n:n + 37])
    await response.write_eof()
    return response


async def _gzip(request):
    return web.Response(body=gzip.compress(BODY),
                        headers={"content-type": "text/event-stream", "content-encoding": "gzip"})


async def _dies(request):
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(BODY[:200])
    request.transport.abort()  # mid-body, mid-chunk: no terminating chunk
    return response


async def _serve(handler, path="/v1/chat/completions"):
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def _read_all(handler):
    runner, url = await _serve(handler)
    target = Target(url=url, api_key="sk-test", key=url, name="test")
    try:
        stream = await client.open_stream(target, {"model": "m", "messages": [], "stream": True}, "req-1")
        gc.collect()
        # Read directly, the stream keeps no httpx2 response (its request, headers and JSON body) for its life.
        # type(), not isinstance(): a weakref proxy among the objects (another test's, whose referent died) would raise
        # ReferenceError when asked for its class.
        direct = not any(issubclass(type(thing), httpx2.Response) for thing in gc.get_objects())
        payloads = []
        try:
            while (batch := await stream.read_batch()) is not None:
                payloads.extend(event.data for event in batch)
        finally:
            await stream.aclose()
        return direct, payloads
    finally:
        await client.close_clients()
        await runner.cleanup()


@pytest.mark.django_db(transaction=False)
def test_a_plain_stream_is_read_directly_and_whole():
    direct, payloads = asyncio.run(_read_all(_plain))
    assert direct
    assert payloads == [*EVENTS, b"[DONE]"]


@pytest.mark.django_db(transaction=False)
def test_a_compressed_stream_is_decoded_through_httpx2():
    direct, payloads = asyncio.run(_read_all(_gzip))
    assert not direct
    assert payloads == [*EVENTS, b"[DONE]"]


@pytest.mark.django_db(transaction=False)
def test_a_provider_that_dies_mid_body_is_an_upstream_error():
    with pytest.raises(UpstreamError) as raised:
        asyncio.run(_read_all(_dies))
    assert raised.value.status == 502
    assert raised.value.code == "upstream_unreachable"  # as through the SDK's vendored transport


def test_the_environment_s_proxy_is_used_unless_no_proxy_names_the_host(monkeypatch):
    """HTTP_PROXY and NO_PROXY as httpx2's trust_env honoured them, resolved once per client (aiohttp's own
    trust_env would look for a ~/.netrc on every request, in a thread)."""
    seen = []

    async def proxy(request):  # a forward proxy that answers itself: the request line names the provider's URL
        seen.append(str(request.url))
        return await _plain(request)

    async def through_proxy(no_proxy):
        runner, proxy_url = await _serve(proxy, "/{tail:.*}")
        monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1"))
        monkeypatch.setenv("NO_PROXY", no_proxy)
        url = "http://provider.invalid/v1"
        target = Target(url=url, api_key="sk-test", key=url, name="test")
        try:
            stream = await client.open_stream(target, {"model": "m", "messages": [], "stream": True}, "req-1")
            payloads = []
            while (batch := await stream.read_batch()) is not None:
                payloads.extend(event.data for event in batch)
            await stream.aclose()
            return payloads
        finally:
            await client.close_clients()
            await runner.cleanup()

    assert asyncio.run(through_proxy("")) == [*EVENTS, b"[DONE]"]
    assert seen == ["http://provider.invalid/v1/chat/completions"]
    with pytest.raises(UpstreamError) as raised:  # exempt: straight to a host that does not exist
        asyncio.run(through_proxy("provider.invalid"))
    assert raised.value.code == "upstream_unreachable"
    assert len(seen) == 1


def test_a_netrc_entry_for_the_provider_changes_nothing(monkeypatch, tmp_path):
    """The provider's key is the only credential sent. With aiohttp's trust_env (once tried for the proxy) every
    request looked for a ~/.netrc in a thread, and an entry for the provider's host made aiohttp refuse to send the
    request at all (an Authorization header and netrc credentials together: ValueError, a 502 for every request)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    authorizations = []

    async def provider(request):
        authorizations.append(request.headers.get("authorization"))
        return await _plain(request)

    direct, payloads = asyncio.run(_read_all(provider))
    assert payloads == [*EVENTS, b"[DONE]"]
    assert authorizations == ["Bearer sk-test"]


@pytest.mark.django_db(transaction=False)
@pytest.mark.parametrize("mount", ["/v1", "/api/openai/v1"])
def test_the_provider_gets_the_request_s_id_and_key_and_nothing_of_the_sdk_s_telemetry(mount):
    """The request reaches the endpoint under the provider's base URL (a gateway's, with a path of its own too), with
    the request's id, the key and the SDK's User-Agent, and none of the SDK's X-Stainless-* headers (this host's OS,
    architecture and Python, the SDK's version, retry count and read timeout: docs/performance.md, "Session 14")."""
    seen = []

    async def provider(request):
        seen.append((request.path, dict(request.headers)))
        return await _plain(request)

    async def run():
        runner, url = await _serve(provider, mount + "/chat/completions")
        url = url.removesuffix("/v1") + mount
        target = Target(url=url, api_key="sk-test", key=url, name="test")
        try:
            stream = await client.open_stream(target, {"model": "m", "messages": [], "stream": True}, "req-7")
            while await stream.read_batch() is not None:
                pass
            await stream.aclose()
        finally:
            await client.close_clients()
            await runner.cleanup()

    asyncio.run(run())
    [(path, headers)] = seen
    assert path == mount + "/chat/completions"
    lower = {name.lower(): value for name, value in headers.items()}
    assert lower["x-client-request-id"] == "req-7"
    assert lower["authorization"] == "Bearer sk-test"
    assert lower["user-agent"].startswith("AsyncOpenAI/Python")
    assert not [name for name in lower if name.startswith("x-stainless")], lower
