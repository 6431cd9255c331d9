"""The simulator's pacing: between two tokens a stream sleeps on a Disconnect, which ends the sleep as soon as the
gateway goes (so a vanished reader releases the simulated provider at once, as a real provider's stream ends)."""

import asyncio
import socket
import sys
import time

import httpx2

from bench.servers import start_server
from streaming.simulator.app import Disconnect


def test_a_sleep_lasts_its_time_when_nobody_goes():
    async def main():
        loop = asyncio.get_running_loop()
        disconnect = Disconnect()
        started = loop.time()
        went = await disconnect.sleep(0.05)
        return went, loop.time() - started, disconnect.is_set()

    went, slept, is_set = asyncio.run(main())
    assert went is False and not is_set
    assert slept >= 0.05 - 0.002  # a timer never runs early (the loop's clock, its resolution)


def test_a_sleep_ends_when_the_gateway_goes_and_every_later_one_at_once():
    async def main():
        loop = asyncio.get_running_loop()
        disconnect = Disconnect()
        loop.call_soon(disconnect.set)
        started = loop.time()
        went = await disconnect.sleep(3600)
        took = loop.time() - started
        later = await disconnect.sleep(3600)  # already gone: no wait at all
        await disconnect.wait()
        return went, took, later

    went, took, later = asyncio.run(main())
    assert went is True and later is True
    assert took < 60  # not the hour it asked for


def test_wait_returns_once_the_gateway_goes():
    async def main():
        loop = asyncio.get_running_loop()
        disconnect = Disconnect()
        waiting = asyncio.ensure_future(disconnect.wait())
        await asyncio.sleep(0)
        assert not waiting.done()
        disconnect.set()
        await asyncio.wait_for(waiting, timeout=5)
        return loop

    asyncio.run(main())


def test_a_paced_stream_ends_as_soon_as_its_reader_goes():
    """A real simulator process, one token every 20 s: the client takes the first event and closes; the simulator
    records the disconnect long before the next token was due."""
    with start_server([sys.executable, "-m", "streaming.simulator", "--port", "{port}"]) as server:
        http = httpx2.Client(base_url=server.base_url, timeout=10)
        http.post("/control", json={"tokens_per_second": 0.05}).raise_for_status()
        body = (b'{"model":"sim-small","stream":true,"max_tokens":5,'
                b'"messages":[{"role":"user","content":"go"}]}')
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
                         b"X-Client-Request-Id: req_paced_gone\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            while b'"role":"assistant"' not in seen:  # the role chunk: the stream is now pacing its first token
                chunk = sock.recv(65536)
                assert chunk, "the simulator closed before its first event"
                seen += chunk
        closed_at = time.monotonic()
        record = None
        while time.monotonic() - closed_at < 10:  # half the token interval
            record = next((r for r in http.get("/stats").json()["requests"]
                           if r["client_request_id"] == "req_paced_gone"), None)
            if record and record["disconnected"]:
                break
            time.sleep(0.05)  # polling another process's stats, with a deadline: not a synchronisation by sleep
        http.close()
    assert record is not None and record["disconnected"] and record["tokens_sent"] == 0
