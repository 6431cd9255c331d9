"""POST /v1/responses (issue 16, item 5) through real gateway processes and the simulated provider's /responses, with
the official SDK, sync and async: `responses.create` streamed and not, the `responses.stream` helper, the ledger row
each settles (usage details included), a quota that runs out mid-stream, a stalled reader, a provider that fails
before its first byte and one that fails mid-stream."""

import json
import socket

import httpx2
import openai
import pytest
from django.db.models import Sum

from quotas.models import Usage

from streaming.simulator.app import WORDS
from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def words(count):
    """The simulator's plain answer: `count` tokens of its words."""
    return "".join(f" {WORDS[i % len(WORDS)]}" for i in range(count))


def sdk(gateway, caller):
    return openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)


def test_create_without_streaming_settles_the_providers_usage_with_its_details(sim, make_user):
    caller = make_user()
    sim.control(reasoning_tokens=5, cached_tokens=4)
    raw = sdk(sim, caller).responses.with_raw_response.create(
        model="sim-small", instructions="Be brief.", input="hello", max_output_tokens=7)
    response = raw.parse()
    assert response.output_text == words(7)
    # The provider stopped at max_output_tokens: OpenAI's incomplete response.
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    usage = response.usage
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (7 + 5, 5)
    assert usage.input_tokens_details.cached_tokens == 4
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.stream, row.usage_reported) == ("completed", False, True)
    assert (row.prompt_tokens, row.completion_tokens) == (usage.input_tokens, 12)
    assert (row.reasoning_tokens, row.cached_tokens) == (5, 4)
    assert row.charged_tokens == usage.input_tokens + 12
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0


def test_create_streaming_relays_the_event_stream_and_settles_its_usage(sim, make_user):
    caller = make_user()
    raw = sdk(sim, caller).responses.with_raw_response.create(
        model="sim-large", input=[{"role": "user", "content": [{"type": "input_text", "text": "tell me"}]}],
        max_output_tokens=100, stream=True, temperature=0.5, store=False)
    events = list(raw.parse())
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == words(48)  # the simulator's whole answer, under max_output_tokens
    final = events[-1].response
    assert final.output_text == words(48) and final.id == events[0].response.id
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.stream, row.usage_reported) == ("completed", True, True)
    assert final.usage.output_tokens == 48
    assert (row.prompt_tokens, row.completion_tokens) == (final.usage.input_tokens, 48)
    assert (row.reasoning_tokens, row.cached_tokens) == (0, 0)
    assert row.bytes_sent > 0 and row.time_to_first_token_ms is not None


def test_the_wire_format_is_the_responses_apis(sim, make_user):
    caller = make_user()
    with httpx2.stream("POST", sim.api_url + "/responses", headers={"Authorization": f"Bearer {caller.key}"},
                       json={"model": "sim-small", "input": "hi", "stream": True, "max_output_tokens": 3}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    blocks = [block for block in body.decode().split("\n\n") if block and not block.startswith(":")]
    for block in blocks:  # each event names itself on an `event:` line, as OpenAI writes them
        kind, data = block.split("\n")
        assert kind == "event: " + json.loads(data.removeprefix("data: "))["type"]
    assert "[DONE]" not in body.decode()  # this API ends with its last event
    assert json.loads(blocks[-1].split("data: ", 1)[1])["type"] == "response.incomplete"


def test_the_stream_helper_gets_its_final_response(sim, make_user):
    caller = make_user()
    with sdk(sim, caller).responses.stream(model="sim-small", input="hi", max_output_tokens=100) as stream:
        snapshots = [event.snapshot for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert snapshots[-1] == final.output_text == words(48)
    assert final.usage.output_tokens == 48


async def test_the_async_client_streams_and_not(sim, make_user):
    from asgiref.sync import sync_to_async

    caller = await sync_to_async(make_user)()
    client = openai.AsyncOpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0, timeout=30)
    try:
        response = await client.responses.create(model="sim-small", input="x", max_output_tokens=4)
        assert response.output_text == words(4)
        stream = await client.responses.create(model="sim-small", input="x", max_output_tokens=5, stream=True)
        text = "".join([event.delta async for event in stream if event.type == "response.output_text.delta"])
        assert text == words(5)
        # (The helper's final response is a completed one: not one cut at max_output_tokens.)
        async with client.responses.stream(model="sim-small", input="x", max_output_tokens=100) as helper:
            async for _ in helper:
                pass
            final = await helper.get_final_response()
        assert final.output_text == words(48)
    finally:
        await client.close()


def test_refusals_are_openai_errors(sim, make_user):
    caller = make_user(allowed_models=["sim-large"])
    client = sdk(sim, caller)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="sim-small", input="x")
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="sim-large", input="x", background=True)
    assert (error.value.code, error.value.param) == ("invalid_value", "background")
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="sim-large", input=42)
    assert (error.value.code, error.value.param) == ("invalid_type", "input")


def test_a_provider_that_fails_before_its_first_byte_is_an_openai_error(sim, make_user):
    caller = make_user()
    sim.control(fail_500_rate=1.0)
    client = sdk(sim, caller)
    for stream in (False, True):
        raw = client.responses.with_raw_response
        with pytest.raises(openai.InternalServerError) as error:
            raw.create(model="sim-small", input="x", stream=stream)
        assert error.value.status_code == 502 and error.value.code == "upstream_error"
        row = settled_row(error.value.response.headers["x-request-id"])
        assert (row.status, row.reason, row.charged_tokens) == ("upstream_error", "upstream_error", 0)


def test_a_provider_that_fails_mid_stream_ends_it_with_an_error_the_sdk_raises(sim, make_user):
    caller = make_user()
    sim.control(fail_midstream_after=3)
    raw = sdk(sim, caller).responses.with_raw_response.create(model="sim-small", input="x", stream=True)
    deltas = []
    with pytest.raises(openai.APIError) as error:
        for event in raw.parse():
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    assert error.value.code == "upstream_error" and len(deltas) == 3
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.completion_tokens, row.usage_reported) == ("upstream_error", 3, False)


def test_a_quota_that_runs_out_mid_stream_ends_with_the_responses_apis_events(sim, make_user):
    caller = make_user(tokens_per_day=300)
    # Slow enough that the second request below is answered before this stream needs its second lease (its first
    # block is 32 tokens: 3 s at this pace).
    sim.control(tokens_per_second=10, default_tokens=1000)
    headers = {"Authorization": f"Bearer {caller.key}"}
    with httpx2.stream("POST", sim.api_url + "/responses", headers=headers, timeout=30,
                       json={"model": "sim-small", "input": "go", "stream": True, "max_output_tokens": 250}) as stream:
        lines = stream.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "response.output_text.delta":
                    break
        # Another request spends what is left of the day while the stream runs.
        other = sdk(sim, caller).responses.create(model="sim-small", input="go", max_output_tokens=250)
        assert other.usage.output_tokens > 200
        events += [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        request_id = stream.headers["x-request-id"]
    error, failed = events[-2:]
    assert (error["type"], error["code"], error["error"]["code"]) == ("error", "insufficient_quota",
                                                                      "insufficient_quota")
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"]["code"] == "insufficient_quota"
    assert failed["response"]["id"] == events[0]["response"]["id"]  # the response the SDK was created with
    # Sluice's events number on from the provider's (past the event the quota stopped, which was not sent).
    numbers = [event["sequence_number"] for event in events]
    assert numbers == sorted(set(numbers)) and numbers[:-2] == list(range(len(events) - 2))
    delivered = sum(1 for event in events if event["type"] == "response.output_text.delta")
    assert failed["response"]["usage"]["output_tokens"] == delivered
    row = settled_row(request_id)
    assert (row.status, row.reason, row.completion_tokens) == ("quota_exhausted", "insufficient_quota", delivered)
    # Both requests' charges fit in the day's 300 tokens.
    charged = eventually(lambda: Usage.objects.filter(user=caller.user).exclude(status="streaming").count() == 2
                         and Usage.objects.filter(user=caller.user).aggregate(total=Sum("charged_tokens"))["total"])
    assert charged <= 300


@pytest.fixture(scope="module")
def stalling(django_db_setup, django_db_blocker):
    """A gateway that cuts a stalled reader after 3 s."""
    with gateway_server(STREAM_STALL_TIMEOUT=3) as gateway:
        yield gateway


def test_a_stalled_reader_is_cut_off_and_settled(stalling, make_user):
    stalling.reset()
    # ~200 bytes of padding per event: tens of MB asked, far more than the sockets along the way hold.
    stalling.control(default_tokens=200_000, token_padding=200)
    caller = make_user(tokens_per_day=10**9, tokens_per_month=10**9, max_tokens_per_request=10**6,
                       concurrent_streams=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stalling.server.port))
    body = json.dumps({"model": "sim-small", "input": "go", "stream": True, "max_output_tokens": 200_000}).encode()
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + caller.key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200")
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id"))
    try:
        row = settled_row(request_id, timeout=20)  # nothing more is read: cut after STREAM_STALL_TIMEOUT
        assert row.status == "client_stalled" and 0 < row.completion_tokens < 200_000
        eventually(lambda: stalling.sim_request(request_id)["disconnected"], timeout=5)
        # The user's one concurrent stream is free again.
        client = openai.OpenAI(base_url=stalling.api_url, api_key=caller.key, max_retries=0, timeout=30)
        assert client.responses.create(model="sim-small", input="x", max_output_tokens=2).output_text == words(2)
    finally:
        sock.close()
        stalling.reset()
