"""streaming/provider/response_events.py: the Responses API's stream, classified for the relay (issue 16, item 5)."""

import json

import pytest

from streaming.provider.events import CHUNK, DONE, ERROR, INVALID
from streaming.provider.response_events import ResponseEvents


def event(kind, **fields):
    return json.dumps({"type": kind, **fields}).encode()


CREATED = event("response.created", sequence_number=0, response={"id": "resp_1", "object": "response",
                                                                    "status": "in_progress", "output": []})


@pytest.mark.parametrize("data, kind, tokens, begins, finished", [
    (CREATED, CHUNK, 0, False, False),  # a prelude: the answer has not begun
    (event("response.output_item.added", output_index=0, item={"type": "message"}), CHUNK, 0, False, False),
    # Metered: the answer, a refusal, reasoning (raw or summarised), a tool's arguments (o200k_base tokens).
    (event("response.output_text.delta", delta=" three more words"), CHUNK, 3, True, False),
    (event("response.refusal.delta", delta="I cannot"), CHUNK, 2, True, False),
    (event("response.reasoning_text.delta", delta="let me think"), CHUNK, 3, True, False),
    (event("response.reasoning_summary_text.delta", delta="hmm"), CHUNK, 2, True, False),
    (event("response.function_call_arguments.delta", delta='{"city": "Paris"}'), CHUNK, 6, True, False),
    (event("response.output_text.delta", delta=""), CHUNK, 0, False, False),
    (event("response.output_text.done", text="the whole text"), CHUNK, 0, False, False),  # not counted twice
    # The last state: the answer is complete (incomplete: stopped at the provider's own limit).
    (event("response.completed", response={"usage": {"input_tokens": 1}}), CHUNK, 0, True, True),
    (event("response.incomplete", response={"usage": None}), CHUNK, 0, True, True),
    # The provider failed: the relay writes its own ending.
    (event("error", code="server_error", message="boom"), ERROR, 0, True, False),
    (event("response.failed", response={"error": {"code": "server_error"}}), ERROR, 0, True, False),
    (b'{"error": {"message": "boom"}}', ERROR, 0, True, False),
    (b"[DONE]", DONE, 0, True, False),
    (b"not json", INVALID, 0, True, False),
    (b'{"type": ["not", "a", "name"]}', CHUNK, 0, False, False),
])
def test_classify(data, kind, tokens, begins, finished):
    classified = ResponseEvents()(data)
    assert (classified.kind, classified.tokens, classified.begins_answer, classified.finished) == (
        kind, tokens, begins, finished)


def test_each_event_is_written_with_its_name():
    classify = ResponseEvents()
    assert classify(CREATED).data == b"event: response.created\ndata: " + CREATED
    # A payload written over several data: lines (joined by the SSE parser) keeps its lines.
    assert classify(b'{"type": "x.y",\n"a": 1}').data == b'event: x.y\ndata: {"type": "x.y",\ndata: "a": 1}'
    # A type that cannot be an event line (a line break) is written without one.
    assert classify(b'{"type": "a\\nb"}').data == b'data: {"type": "a\\nb"}'


def test_the_usage_is_the_final_responses():
    usage = {"input_tokens": 5, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}}
    classified = ResponseEvents()(event("response.completed", response={"id": "resp_1", "usage": usage}))
    assert classified.usage == usage


def test_it_remembers_what_sluices_own_events_continue():
    classify = ResponseEvents()
    classify(CREATED)
    classify(event("response.output_item.done", sequence_number=7, output_index=1, item={"id": "fc_1"}))
    classify(event("response.output_item.done", sequence_number=8, output_index=0, item={"id": "msg_1"}))
    assert classify.response["id"] == "resp_1"
    assert [item["id"] for _, item in sorted(classify.output.items())] == ["msg_1", "fc_1"]
    assert classify.next_sequence_number() == 9 and classify.next_sequence_number() == 10
