"""streaming/streams/relay.py and watchdog.py, driven directly: metering through the callback, the mid-stream cut,
the watchdog's stall cut-off and provider timeouts.

The provider is the real simulator in a process of its own, reached over loopback through the official client and
the provider side (streaming/provider/); the relay's response body is read here, in this test's event loop, as a
server would. The meter, heartbeat and stall callbacks are the test's: they are the relay's whole view of quotas.
"""

import asyncio
import gc
import json
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx2
import pytest

from bench.servers import start_server
from quotas.domain.exceptions import QuotaExceeded
from streaming.provider import client, retries
from streaming.streams.relay import Relay
from streaming.streams.watchdog import Watchdog

MONTH_END = datetime(2027, 1, 1, tzinfo=UTC)


def relay_settings(**overrides):
    """The settings the relay and its watchdog read (plain values: each test sets its own)."""
    values = {"STREAM_HEARTBEAT_INTERVAL": 10.0, "STREAM_STALL_TIMEOUT": 30.0, "QUOTA_SLOT_TTL": 30.0,
              "UPSTREAM_IDLE_TIMEOUT": 60.0, "UPSTREAM_FIRST_TOKEN_TIMEOUT": 60.0, "STREAM_MAX_DURATION": 600.0}
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def provider():
    with start_server([sys.executable, "-m", "streaming.simulator", "--port", "{port}"]) as server:
        yield server


@pytest.fixture
def simulator(provider):
    """The simulator's switches (POST /control), reset around each test."""
    http = httpx2.Client(base_url=provider.base_url, timeout=10)
    http.post("/control/reset").raise_for_status()

    def control(**switches):
        http.post("/control", json=switches).raise_for_status()

    control.stats = lambda: http.get("/stats").json()
    yield control
    http.post("/control/reset").raise_for_status()
    http.close()


class Meter:
    """A meter that grants `block` tokens at a time up to `limit`, then refuses as a spent month would."""

    def __init__(self, limit, block=10):
        self.limit, self.block, self.calls = limit, block, []

    async def __call__(self, total):
        self.calls.append(total)
        if total > self.limit:
            raise QuotaExceeded("month", 3600.0, MONTH_END)
        return min(self.limit, max(total, (len(self.calls)) * self.block))


async def open_relay(provider, request_id, max_tokens=40, meter=None, settings=None, heartbeat=None, on_stall=None):
    url = provider.base_url + "/v1"
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    events = await retries.open_stream(url, body, request_id, fair_key=1)

    async def nothing():
        return None

    loop = asyncio.get_running_loop()
    return Relay(events, request_id=request_id, include_usage=False, meter=meter or Meter(10_000),
                 heartbeat=heartbeat or nothing, on_stall=on_stall or nothing, started=loop.time(),
                 settings=settings or relay_settings())


async def sim_record(simulator, request_id, condition, timeout=5.0):
    """The simulator's record of `request_id` once `condition(record)` holds (or the last one seen, after `timeout`),
    polled with this loop running."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        record = next(r for r in simulator.stats()["requests"] if r["client_request_id"] == request_id)
        if condition(record) or asyncio.get_running_loop().time() > deadline:
            return record
        await asyncio.sleep(0.05)


def payloads(body: bytes):
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def content_tokens(body: bytes):
    return sum(1 for p in payloads(body) if p.startswith(b"{") and b'"content":' in p and b'"content":""' not in p)


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    await client.close_clients()


async def test_every_token_is_metered_before_it_is_sent_and_the_stream_completes(provider, simulator):
    simulator(tokens_per_second=0)
    meter = Meter(10_000, block=10)
    relay = await open_relay(provider, "req_relay_meter", max_tokens=40, meter=meter)
    body = b"".join([part async for part in relay.parts()])
    ending = await relay.close()
    assert payloads(body)[-1] == b"[DONE]"
    assert content_tokens(body) == 40 == ending.figures.completion_tokens
    # The meter is asked only when the tokens to send pass what it covered: once per block, not per token.
    assert meter.calls == sorted(meter.calls) and 4 <= len(meter.calls) <= 5
    assert ending.outcome == "completed" and ending.reported_usage["completion_tokens"] == 40
    # The usage chunk Sluice asked for is not relayed to a client that did not ask for it.
    assert b'"usage":{' not in body.replace(b" ", b"") or b'"usage":null' in body.replace(b" ", b"")


async def test_a_refused_meter_cuts_the_stream_with_the_window_that_ran_out(provider, simulator):
    simulator(tokens_per_second=200, default_tokens=500)  # still answering when the quota runs out
    relay = await open_relay(provider, "req_relay_cut", max_tokens=500, meter=Meter(25, block=10))
    body = b"".join([part async for part in relay.parts()])
    ending = await relay.close()
    last = json.loads(payloads(body)[-1])
    assert last["error"]["code"] == "insufficient_quota"
    assert "monthly token quota" in last["error"]["message"] and MONTH_END.isoformat() in last["error"]["message"]
    # Exactly what was covered reached the client, and that is what the ending charges.
    assert content_tokens(body) == 25 == ending.figures.completion_tokens
    assert (ending.outcome, ending.reason) == ("quota_exhausted", "insufficient_quota")
    # The provider was told to stop: its connection was closed before the end of its answer. (The socket's close
    # completes on a later turn of this test's loop, and the simulator sees it after that: polled, yielding to the
    # loop, not read at once — a blocking read right after close() once saw it still open.)
    record = await sim_record(simulator, "req_relay_cut", lambda r: r["disconnected"])
    assert record["disconnected"] and record["tokens_sent"] < 500


async def stall_reading(provider, request_id, heartbeat=None):
    """A relay whose client reads two writes, then holds the second without asking for more (the server's send never
    returns), with a stall timeout of 0.4 s: returned once the watchdog has cut it off (its on_stall ran and its
    handler was cancelled)."""
    stalled = asyncio.Event()

    async def on_stall():
        stalled.set()

    relay = await open_relay(provider, request_id, max_tokens=1000, heartbeat=heartbeat, on_stall=on_stall,
                             settings=relay_settings(STREAM_STALL_TIMEOUT=0.4))
    never = asyncio.Event()

    async def reader():
        parts = relay.parts()
        await anext(parts)
        await anext(parts)
        await never.wait()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(stalled.wait(), timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)  # the handler is cancelled, which ends the response
    return relay


async def test_the_watchdog_cuts_off_a_client_that_stops_reading(provider, simulator):
    simulator(tokens_per_second=50, default_tokens=1000)
    relay = await stall_reading(provider, "req_relay_stall")
    assert relay.outcome == "client_stalled"
    ending = await relay.close("client_stalled")
    assert ending.outcome == "client_stalled" and 0 < ending.figures.completion_tokens < 1000


async def test_one_task_watches_every_stream(provider, simulator):
    # A process's timers do not grow with its streams: one task (one timer, one wake-up a tick) checks every
    # stream's watchdog, and every stream's heartbeat runs on its ticks. There used to be a watchdog task (its
    # coroutine, its sleep's timer) for each stream: ~1.1 KB and a wake-up a second each, at 1,000 streams.
    simulator(tokens_per_second=20, default_tokens=1000)
    streams = 10
    beaten = [asyncio.Event() for _ in range(streams)]

    def heartbeat_of(beat):
        async def heartbeat():
            beat.set()
        return heartbeat

    relays = [await open_relay(provider, f"req_relay_many_{i}", max_tokens=1000, heartbeat=heartbeat_of(beaten[i]),
                               settings=relay_settings(STREAM_STALL_TIMEOUT=0.4))
              for i in range(streams)]
    before = len(asyncio.all_tasks())
    readers = [asyncio.create_task(_collect(relay)) for relay in relays]
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in beaten)), timeout=5)
        # Each stream: its reader (a server's handler) and its relay's pump. One ticker for all of them.
        assert len(asyncio.all_tasks()) - before == 2 * streams + 1
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for relay in relays:
            await relay.close("client_disconnected")


async def test_a_failing_heartbeat_does_not_end_the_watch(provider, simulator, caplog):
    # A heartbeat that raised used to kill its stream's watchdog task: a client that then stopped reading was never
    # cut off, and held its connection and its provider until the server's own timeouts.
    simulator(tokens_per_second=50, default_tokens=1000)

    async def heartbeat():
        raise RuntimeError("the counter store failed")

    relay = await stall_reading(provider, "req_relay_failing_beat", heartbeat=heartbeat)
    ending = await relay.close("client_stalled")
    assert ending.outcome == "client_stalled"
    assert "watchdog action failed for req_relay_failing_beat" in caplog.text


async def test_a_finished_relay_is_freed_without_the_cyclic_collector(provider, simulator):
    # The relay and its watchdog referred to each other, and the lifecycle's callbacks that both held led back to
    # them: every stream outlived its end, with its buffer, its figures and its provider stream, until the cyclic
    # collector reached it (docs/performance.md, "Session 13").
    simulator(tokens_per_second=0, default_tokens=20)

    def live(cls):
        return sum(type(o) is cls for o in gc.get_objects())

    gc.collect()
    before = live(Relay), live(Watchdog)
    gc.disable()
    try:
        relay = await open_relay(provider, "req_relay_freed", max_tokens=100)
        body = b"".join(await asyncio.wait_for(_collect(relay), timeout=10))
        assert content_tokens(body) == 20
        assert (await relay.close()).outcome == "completed"
        del relay
        await asyncio.sleep(0)
        assert (live(Relay), live(Watchdog)) == before
    finally:
        gc.enable()


async def test_a_provider_silent_mid_answer_ends_with_a_timeout_event(provider, simulator):
    simulator(tokens_per_second=0, stall_midstream_after=5)
    beats = []

    async def heartbeat():
        beats.append(1)

    relay = await open_relay(provider, "req_relay_idle", max_tokens=100, heartbeat=heartbeat,
                             settings=relay_settings(UPSTREAM_IDLE_TIMEOUT=0.4))
    body = b"".join(await asyncio.wait_for(_collect(relay), timeout=10))
    ending = await relay.close()
    last = json.loads(payloads(body)[-1])
    assert last["error"]["code"] == "upstream_timeout"
    assert content_tokens(body) == 5 == ending.figures.completion_tokens
    assert (ending.outcome, ending.reason) == ("upstream_error", "upstream_timeout")
    assert beats  # the lifecycle's heartbeat ran on the watchdog's ticks


async def _collect(relay):
    return [part async for part in relay.parts()]


async def test_reasoning_is_metered_as_it_streams(dialects):
    # vLLM >= 0.17 streams its thinking as delta.reasoning before the answer: it is billed, so it is metered (and
    # it is the stream's first token, for the first-token timeout).
    meter = Meter(10_000, block=4)
    url = dialects.base_url + "/v1"
    body = {"model": "reasoning", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20, "stream": True}
    events = await retries.open_stream(url, body, "req_relay_reasoning", fair_key=1)

    async def nothing():
        return None

    relay = Relay(events, request_id="req_relay_reasoning", include_usage=False, meter=meter, heartbeat=nothing,
                  on_stall=nothing, started=asyncio.get_running_loop().time(), settings=relay_settings())
    body = b"".join([part async for part in relay.parts()])
    ending = await relay.close()
    assert body.count(b'"reasoning": " think"') == 10 and body.count(b'"content": " tok"') == 10
    assert ending.figures.completion_tokens == 20
    assert meter.calls[0] <= 10  # the meter was asked during the thinking, before any answer text


# n > 1: each choice held to max_tokens on its own (issue 16, item 2). The provider here is a list of payloads: chunks
# that carry several choices at once, which no dialect of the simulator sends.


class Payloads:
    """A provider's stream made of the given payloads, one read each."""

    awaiting_first_token = False

    def __init__(self, *chunks):
        from streaming.provider.events import classify

        self.batches = [[classify(chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode())]
                        for chunk in chunks]

    async def read_batch(self):
        return self.batches.pop(0) if self.batches else None

    async def aclose(self):
        self.batches = []


def choices_chunk(*choices):
    return {"id": "chatcmpl-n", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
                        for index, text, finish in choices]}


async def relay_of(events, max_tokens, choices):
    async def nothing():
        return None

    relay = Relay(events, request_id="req_relay_n", include_usage=False, meter=Meter(10_000), heartbeat=nothing,
                  on_stall=nothing, started=asyncio.get_running_loop().time(), settings=relay_settings(),
                  max_tokens=max_tokens, choices=choices)
    body = b"".join([part async for part in relay.parts()])
    return [json.loads(p) if p != b"[DONE]" else "[DONE]" for p in payloads(body)], await relay.close()


async def test_a_choice_past_its_max_tokens_is_ended_while_the_others_go_on():
    sent, ending = await relay_of(Payloads(
        choices_chunk((0, " a", None), (1, " b", None)),
        choices_chunk((0, " a a a", None), (1, " b", None)),  # choice 0 would reach 4 of 3
        choices_chunk((0, " a", None), (1, " b", None)),
        choices_chunk((0, None, "stop"), (1, None, "stop")),
        b"[DONE]"), max_tokens=3, choices=2)
    relayed = [[(c["index"], c["delta"].get("content"), c["finish_reason"]) for c in chunk["choices"]]
               for chunk in sent[:-1]]
    assert relayed == [
        [(0, " a", None), (1, " b", None)],
        [(1, " b", None)], [(0, None, "length")],  # the chunk without choice 0, then Sluice's end of it
        [(1, " b", None)],
        [(1, None, "stop")],
    ] and sent[-1] == "[DONE]"
    assert (ending.outcome, ending.figures.completion_tokens) == ("completed", 4)


async def test_when_every_choice_is_past_its_max_tokens_the_stream_ends():
    sent, ending = await relay_of(Payloads(
        *[choices_chunk((0, " a", None), (1, " b", None))] * 5, b"[DONE]"), max_tokens=2, choices=2)
    finishes = [(c["index"], c["finish_reason"]) for chunk in sent[:-1] for c in chunk["choices"] if c["finish_reason"]]
    assert finishes == [(0, "length"), (1, "length")] and sent[-1] == "[DONE]"
    assert (ending.outcome, ending.figures.completion_tokens) == ("completed", 4)
