"""streaming/provider/events.py: the one SSE parser and classifier, on the wire formats of several providers."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.provider import events
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


class _GeneralParser(SSEParser):
    """The parser without its one-event fast path: what it was."""

    def feed(self, piece):
        return self._split(piece)


_SSE_PIECES = st.lists(st.sampled_from([b"data:", b"data: ", b'{"a": 1}', b"x", b" ", b":", b"\n", b"\n\n", b"\r",
                                        b"\r\n", b"\r\n\r\n", b"event: e", b"[DONE]"]), max_size=30)


@settings(max_examples=500, deadline=None)
@given(stream=_SSE_PIECES, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_the_parser_gives_what_its_general_path_gives_however_the_bytes_are_cut(stream, cuts):
    body = b"".join(stream)
    bounds = sorted({min(cut, len(body)) for cut in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    ours, reference = SSEParser(), _GeneralParser()
    assert [ours.feed(piece) for piece in pieces] == [reference.feed(piece) for piece in pieces]


@pytest.mark.parametrize("piece", [b'data: {"a": 1}\n\n', b"data:[DONE]\n\n", b"data:\n\n", b'data: {"a": 1}\r\n\n',
                                   b'data: {"a"\n: 1}\n\n', b"data: x\rdata: y\n\n", b": ping\n\n"])
def test_a_one_event_piece_is_parsed_as_the_general_path_parses_it(piece):
    assert SSEParser().feed(piece) == _GeneralParser().feed(piece)


# classify parses with orjson and falls back to the standard library's parser for what orjson refuses. The reference
# below is classify as it was, with the standard library's parser alone: the two must agree on every payload. (One
# difference is left by design: an integer past 64 bits is a float to orjson; a token count that large is clamped
# anyway.)
_INTS = st.integers(min_value=-2**63, max_value=2**64 - 1)
_SCALARS = st.none() | st.booleans() | _INTS | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["content", "reasoning", "refusal", "tool_calls", "function", "name", "arguments", "delta",
                     "finish_reason", "index", "usage", "prompt_tokens", "choices", "error", "x"]) | st.text(max_size=5),
    inner, max_size=4), max_leaves=12)
_CHUNKS = st.fixed_dictionaries({}, optional={
    "choices": st.lists(st.fixed_dictionaries({}, optional={
        "index": _INTS, "finish_reason": _SCALARS,
        "delta": st.fixed_dictionaries({}, optional={"content": _SCALARS, "reasoning": _SCALARS,
                                                     "tool_calls": _JSON, "function_call": _JSON})}) | _JSON,
        max_size=3) | _JSON,
    "usage": _JSON, "error": _JSON, "id": st.text(max_size=8)})


def _reference(data):
    """classify with the standard library's parser alone (what it was)."""
    if data == events.DONE_PAYLOAD:
        return events.Event(data, DONE)
    try:
        chunk = json.loads(data)
    except ValueError:
        return events.Event(data, INVALID)
    return events.classified(data, chunk)


@settings(max_examples=400, deadline=None)
@given(payload=_CHUNKS | _JSON)
def test_classify_agrees_with_the_standard_library_on_every_payload(payload):
    data = json.dumps(payload).encode()  # NaN and Infinity included, as Python's json (and vLLM's logprobs) write them
    ours, reference = classify(data), _reference(data)
    assert [getattr(ours, name) for name in events.Event.__slots__] == [
        getattr(reference, name) for name in events.Event.__slots__] or _nan_equal(ours, reference)


def _nan_equal(ours, reference):
    # NaN != NaN: compare the usage dicts by their JSON text instead.
    return all(getattr(ours, name) == getattr(reference, name) for name in events.Event.__slots__ if name != "usage") \
        and json.dumps(ours.usage) == json.dumps(reference.usage)


@pytest.mark.parametrize("data", [
    b'{"choices": [{"index": 0, "delta": {"content": " hi"}, "logprobs": {"content": [{"logprob": -Infinity}]}}]}',
    b'{"choices": [{"index": 0, "delta": {"content": " hi"}}], "x": NaN}',
    b'{"choices": [{"index": 0, "delta": {"content": "\\ud800 hi"}}]}',  # a lone surrogate
])
def test_what_orjson_refuses_is_classified_as_before(data):
    event = classify(data)
    assert (event.kind, event.tokens) == (CHUNK, _reference(data).tokens) and event.tokens >= 1


@pytest.mark.parametrize("depth", [1_100, 100_000])  # past orjson's 1,024 levels; past the standard library's too
def test_a_payload_nested_past_orjsons_depth_is_classified_as_before(depth):
    data = b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"
    assert _outcome(classify, data) == _outcome(_reference, data)


def _outcome(fn, data):
    try:
        event = fn(data)
    except RecursionError as exc:  # the relay reports it as a broken stream (EventStream.push)
        return type(exc)
    return event.kind, event.tokens
