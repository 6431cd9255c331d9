"""streaming/provider/events.py: the one SSE parser and classifier, on the wire formats of several providers."""

import pytest

from streaming.provider.events import CHUNK, DONE, ERROR, INVALID, SSEParser, classify

ROLE = b'{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'


@pytest.mark.parametrize("data, kind, tokens, begins", [
    (ROLE, CHUNK, 0, False),  # a role-only prelude: the answer has not begun
    (b'{"choices": [{"index": 0, "delta": {"content": " the"}}]}', CHUNK, 1, True),
    (b'{"choices": [{"index": 0, "delta": {"content": " three more words"}}]}', CHUNK, 3, True),
    # Reasoning under both names (vLLM >= 0.17 and OpenRouter: reasoning; earlier vLLM, DeepSeek: reasoning_content)
    # and refusals are metered like the answer: their o200k_base tokens ("hmm" is "h" + "mm").
    (b'{"choices": [{"index": 0, "delta": {"reasoning": "let me think"}}]}', CHUNK, 3, True),
    (b'{"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}', CHUNK, 2, True),
    (b'{"choices": [{"index": 0, "delta": {"refusal": "I cannot"}}]}', CHUNK, 2, True),
    # Tool-call deltas count the tokens of their name and argument text, at least one per call (Ollama sends every call
    # with index 0): "get_weather" is 2 tokens, its arguments 13.
    (b'{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}', CHUNK, 1, True),
    (b'{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "get_weather", '
     b'"arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}}]}}]}', CHUNK, 15, True),
    (b'{"choices": [{"index": 0, "delta": {"function_call": {"name": "f"}}}]}', CHUNK, 1, True),
    (b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', CHUNK, 0, True),
    (b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}', CHUNK, 0, True),
    (b'{"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}', ERROR, 0, True),
    (b"[DONE]", DONE, 0, True),
    (b"not json", INVALID, 0, True),
    (b"[1, 2]", INVALID, 0, True),  # JSON, but not an object
    # Malformed parts of a chunk are skipped, not a crash: a choice or delta that is not an object.
    (b'{"choices": ["x", {"delta": "y"}, {"delta": {"content": ["not", "text"]}}]}', CHUNK, 1, True),
])
def test_classify(data, kind, tokens, begins):
    event = classify(data)
    assert (event.kind, event.tokens, event.begins_answer) == (kind, tokens, begins)
    assert event.data == data


def test_usage_is_kept_and_a_usage_only_chunk_has_no_choices():
    event = classify(b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}')
    assert event.usage == {"prompt_tokens": 3, "completion_tokens": 5} and not event.has_choices
    assert classify(b'{"choices": [{"delta": {"content": "a"}}], "usage": null}').usage is None


def test_the_parser_joins_events_split_across_reads_and_handles_crlf_and_multiline_data():
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\nda') == [b'{"a": 1}']
    assert parser.feed(b'ta: {"b": 2}\n') == []
    assert parser.feed(b'\n') == [b'{"b": 2}']
    # CRLF line ends (some proxies); comments and other fields ignored; an event's data lines are one payload.
    assert parser.feed(b": keep-alive\r\n\r\nevent: x\r\ndata: {\"a\":\r\ndata: 3}\r\n\r\n") == [b'{"a":\n3}']
    assert classify(b'{"a":\n3}').kind == CHUNK
    assert parser.feed(b"data:[DONE]\n\n") == [b"[DONE]"]
