"""streaming/gateway/loop_gate.py: while the event loop lags, new /v1/ requests wait at the door, FIFO, and are let in
one per timer tick once it keeps up again (at least one every min_interval whatever the lag); the probes never wait.

The lag is made the way a burst of admissions makes it: code that holds the loop (a blocking call standing in for
CPU work), on a real event loop.
"""

import asyncio
import json
import threading
import time

import pytest
from prometheus_client import REGISTRY

from config import asgi
from streaming.gateway.loop_gate import LoopGate
from tests.streaming.gateway.test_handler import call


def hold_the_loop(seconds):
    time.sleep(seconds)  # the loop's thread is busy: what hundreds of admissions in one turn of the loop do


async def until(predicate, turns=1000):
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def lagged(gate):
    """The gate has seen its timer run late (the loop was held past the limit)."""
    assert gate.enter() is None  # an idle loop: straight through (and the gate's timer runs from now on)
    hold_the_loop(gate.watch + gate.max_lag * 5)  # past the timer's due time by five times the limit
    await until(lambda: not gate.open)


def test_on_a_loop_that_keeps_up_a_request_goes_straight_through():
    async def main():
        gate = LoopGate(max_lag_ms=50, tick=0.001)
        for _ in range(20):
            assert gate.enter() is None
            await asyncio.sleep(0.002)  # the loop runs the gate's timer in between, on time
        return gate

    gate = asyncio.run(main())
    assert gate.open and gate.waited == 0


def test_while_the_loop_lags_requests_wait_and_are_let_in_one_per_tick_in_order():
    async def main():
        gate = LoopGate(max_lag_ms=5, tick=0.05, min_interval=60.0)
        await lagged(gate)
        released = []

        async def request(i):
            waiting = gate.enter()
            assert waiting is not None  # the loop lagged: it queues
            await waiting
            released.append(i)

        tasks = [asyncio.create_task(request(i)) for i in range(3)]
        await until(lambda: gate.queued == 3)
        # The loop keeps up again: the next tick lets in the first, and only the first (one per tick).
        await until(lambda: released, turns=100_000)
        assert released == [0]
        assert not tasks[1].done() and not tasks[2].done()
        await asyncio.gather(*tasks)
        return gate, released

    waited_before = REGISTRY.get_sample_value("sluice_loop_gate_waited_total")
    gate, released = asyncio.run(main())
    assert released == [0, 1, 2]
    assert gate.waited == 3 and gate.open
    # What an operator sees on /metrics: three more requests held, none holding now.
    assert REGISTRY.get_sample_value("sluice_loop_gate_waited_total") == waited_before + 3
    assert REGISTRY.get_sample_value("sluice_loop_gate_waiting") == 0


def test_a_loop_that_keeps_lagging_still_admits_one_every_min_interval():
    async def main():
        loop = asyncio.get_running_loop()
        gate = LoopGate(max_lag_ms=2, tick=0.001, min_interval=0.1)
        await lagged(gate)
        busy = True

        def keep_busy():  # every turn of the loop holds it 20 ms: the lag never falls under the limit
            if busy:
                hold_the_loop(0.02)
                loop.call_soon(keep_busy)

        keep_busy()
        released = []

        async def request(i):
            await gate.enter()
            released.append((i, loop.time()))

        try:
            await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(3))), timeout=30)
        finally:
            busy = False
        return gate, released

    gate, released = asyncio.run(main())
    assert [i for i, _ in released] == [0, 1, 2]
    # Not one let in sooner than min_interval after the one before: the lag held them (it was over the limit).
    assert all(b - a >= 0.1 - 0.005 for (_, a), (_, b) in zip(released, released[1:]))
    assert not gate.open


def test_a_request_cancelled_while_waiting_leaves_the_queue_without_taking_a_turn():
    async def main():
        gate = LoopGate(max_lag_ms=5, tick=0.01, min_interval=60.0)
        await lagged(gate)
        released = []

        async def request(i):
            await gate.enter()
            released.append(i)

        tasks = [asyncio.create_task(request(i)) for i in range(3)]
        await until(lambda: gate.queued == 3)
        tasks[1].cancel()  # its client went away while it waited
        await asyncio.gather(tasks[0], tasks[2])
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return gate, released

    gate, released = asyncio.run(main())
    assert released == [0, 2]
    assert gate.queued == 0


def test_callers_take_turns_so_a_flood_from_one_waits_behind_its_own():
    """Round-robin across callers, first come first served within one: five requests from one key, then one from
    another — the other's goes second, not sixth."""
    async def main():
        gate = LoopGate(max_lag_ms=5, tick=0.005, min_interval=60.0)
        await lagged(gate)
        released = []

        async def request(caller, i):
            await gate.enter(caller)
            released.append((caller, i))

        tasks = [asyncio.create_task(request(b"Bearer greedy", i)) for i in range(5)]
        await until(lambda: gate.queued == 5)
        tasks.append(asyncio.create_task(request(b"Bearer other", 0)))
        await until(lambda: gate.queued == 6)
        await asyncio.gather(*tasks)
        return released

    released = asyncio.run(main())
    assert released == [(b"Bearer greedy", 0), (b"Bearer other", 0)] + [(b"Bearer greedy", i) for i in range(1, 5)]


def test_zero_turns_the_gate_off():
    async def main():
        gate = LoopGate(max_lag_ms=0)
        hold_the_loop(0.05)
        return [gate.enter() for _ in range(3)], gate

    entered, gate = asyncio.run(main())
    assert entered == [None, None, None] and gate.waited == 0 and not gate.enabled


def test_the_api_waits_at_the_gate_while_the_loop_lags_and_the_probes_do_not():
    """Through the ASGI application: on a lagging loop a /v1/ request queues at the gate (and is then answered as
    ever); a probe goes straight on. On a loop of a thread of its own, as a server's (test_handler.py says why)."""
    application = asgi.api_application
    outcome = {}

    async def main():
        gate = application.gate = LoopGate(max_lag_ms=5, tick=0.005, min_interval=60.0)
        await lagged(gate)
        probe = await call(application, "/healthz")
        outcome["after_probe"] = gate.waited
        outcome["api"] = await call(application, "/v1/models")
        outcome["after_api"] = gate.waited

    default = application.gate
    try:
        loop_thread = threading.Thread(target=lambda: asyncio.run(main()))
        loop_thread.start()
        loop_thread.join(timeout=30)
    finally:
        application.gate = default
    assert outcome["after_probe"] == 0  # the probe did not wait
    assert outcome["after_api"] == 1  # the API request did, and then was answered as ever (no key: OpenAI's 401)
    status, body = outcome["api"]
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_the_gate_is_on_by_default_and_set_by_sluice_loop_gate_ms(settings):
    from streaming.gateway.loop_gate import from_settings

    assert asgi.api_application.gate.enabled
    settings.LOOP_GATE_MS = 0
    assert not from_settings().enabled
    settings.LOOP_GATE_MS = 35
    assert from_settings().max_lag == pytest.approx(0.035)


def test_a_waiting_request_s_caller_is_its_credentials_as_sent():
    from streaming.gateway.handler import _caller

    assert _caller({"headers": [(b"host", b"x"), (b"authorization", b"Bearer sk-one")]}) == b"Bearer sk-one"
    assert _caller({"headers": [(b"host", b"x")]}) == b""  # no key: the anonymous requests share one queue
