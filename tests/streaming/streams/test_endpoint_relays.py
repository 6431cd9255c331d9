"""The relays of the other endpoints (streaming/streams/responses.py, text_completions.py), driven directly: what they
write when they end a stream themselves, in their own wire formats.

The provider is the real simulator in a process of its own, reached through the provider side (retries.open_stream
with the endpoint); the meter is the test's (tests/streaming/streams/test_relay.py does the same for chat).
"""

import json

from streaming.provider import retries
from streaming.provider.endpoints import TEXT_COMPLETIONS, Endpoint
from streaming.provider.response_events import ResponseEvents
from streaming.streams.responses import ResponsesRelay
from streaming.streams.text_completions import TextCompletionRelay

from .test_relay import Meter, _close_clients, provider, relay_settings, simulator  # noqa: F401 (fixtures)


async def nothing():
    return None


def options(request_id, max_tokens, meter):
    return dict(request_id=request_id, include_usage=True, meter=meter, heartbeat=nothing, on_stall=nothing,
                started=0.0, settings=relay_settings(), prompt_tokens=8, max_tokens=max_tokens)


def events_of(body: bytes):
    """(event line, data) of each SSE event of a Responses stream."""
    out = []
    for block in body.split(b"\n\n"):
        lines = block.split(b"\n")
        if lines[0].startswith(b"event: "):
            out.append((lines[0][7:].decode(), json.loads(lines[1][6:])))
    return out


async def open_responses(provider, request_id, max_tokens, meter):
    classifier = ResponseEvents()
    body = {"model": "sim-small", "input": "go", "stream": True, "max_output_tokens": 1000}
    events = await retries.open_stream(provider.base_url + "/v1", body, request_id, 1,
                                       Endpoint("/responses", classifier))
    return ResponsesRelay(events, classifier=classifier, model="sim-small", **options(request_id, max_tokens, meter))


async def test_a_responses_stream_past_its_budget_ends_incomplete(provider, simulator):
    simulator(default_tokens=100)
    relay = await open_responses(provider, "req_responses_overrun", 5, Meter(10_000))
    body = b"".join([part async for part in relay.parts()])
    ending = await relay.close()
    events = events_of(body)
    assert all(name == data["type"] for name, data in events)
    assert [data["delta"] for _, data in events if data["type"] == "response.output_text.delta"] == [
        " the", " quick", " brown", " fox", " jumps"]
    last = events[-1][1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["id"] == events[0][1]["response"]["id"]
    assert last["response"]["usage"]["output_tokens"] == 5
    # Numbered after every event the provider sent, those read ahead and not relayed included.
    assert last["sequence_number"] > events[-2][1]["sequence_number"]
    assert (ending.outcome, ending.figures.completion_tokens) == ("completed", 5)


async def test_a_responses_stream_cut_by_the_quota_ends_with_an_error_and_failed(provider, simulator):
    simulator(tokens_per_second=200, default_tokens=500)
    relay = await open_responses(provider, "req_responses_cut", 500, Meter(25, block=10))
    body = b"".join([part async for part in relay.parts()])
    ending = await relay.close()
    (_, error), (_, failed) = events_of(body)[-2:]
    assert (error["type"], error["code"], error["error"]["type"]) == ("error", "insufficient_quota",
                                                                      "insufficient_quota")
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "insufficient_quota"
    assert failed["response"]["usage"]["output_tokens"] == 25 == ending.figures.completion_tokens
    assert (ending.outcome, ending.reason) == ("quota_exhausted", "insufficient_quota")


async def test_a_text_completion_past_its_budget_ends_with_length(provider, simulator):
    simulator(default_tokens=100)
    body = {"model": "sim-small", "prompt": ["a", "b"], "max_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}}
    events = await retries.open_stream(provider.base_url + "/v1", body, "req_text_overrun", 1, TEXT_COMPLETIONS)
    relay = TextCompletionRelay(events, copies=2, **options("req_text_overrun", 6, Meter(10_000)))
    payloads = [line[6:] for line in b"".join([part async for part in relay.parts()]).split(b"\n")
                if line.startswith(b"data: ")]
    ending = await relay.close()
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert sum(1 for chunk in chunks for choice in chunk["choices"] if choice["text"]) == 6
    assert [(c["index"], c["finish_reason"]) for c in chunks[-2]["choices"]] == [(0, "length"), (1, "length")]
    # Sluice's own usage chunk: the provider's was never reached.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert (ending.outcome, ending.figures.completion_tokens) == ("completed", 6)
