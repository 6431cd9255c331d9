"""The provider's server-sent events: split from the byte stream and classified, once, for everyone.

`SSEParser` turns the bytes of a response body into the `data` payloads of its events; `classify` tells what one
payload is. The first-token wait (first_token.py), the permit's outcome (GuardedStream) and the relay
(streaming/streams/relay.py) all read the same `Event`: a payload is parsed as JSON once.
"""

import json

import orjson

from quotas.domain.policy import chunk_tokens

# A payload's JSON: orjson (~0.8 µs for a 240-byte chunk, the standard library ~3.3: one parse per paced token), and the
# standard library's parser for what orjson refuses and the standard library accepts (NaN and Infinity, which
# Python-based servers write in logprobs; lone surrogates; nesting past 1,024 levels): the same chunks are accepted as
# before. One difference: orjson reads an integer past 64 bits as a float (a token count clamps it either way).
_fast_loads = orjson.loads

DONE_PAYLOAD = b"[DONE]"
# Event kinds.
DONE = "done"  # data: [DONE]
ERROR = "error"  # {"error": {...}}: the provider failed mid-answer
INVALID = "invalid"  # not a JSON object
CHUNK = "chunk"  # a completion chunk (choices and/or usage)

# Delta fields that carry text the provider bills as completion tokens: the answer, a refusal, and reasoning under
# both names servers use (vLLM >= 0.17 and OpenRouter send `reasoning`, earlier vLLM and DeepSeek `reasoning_content`).
TEXT_FIELDS = ("content", "reasoning", "reasoning_content", "refusal")


class Event:
    """One payload and what it holds. `tokens`: completion tokens it carries, as metered (quotas' chunk_tokens: the
    o200k_base tokens of its text, at least one per field that carries any). `begins_answer`: the answer has begun
    (or ended) with it, so that a stream may be handed to the client: text, a tool or function call, a finish
    reason, usage, [DONE] — and anything that is not a chunk, which is the relay's to report."""

    __slots__ = ("data", "kind", "tokens", "usage", "has_choices", "begins_answer", "finished")

    def __init__(self, data, kind, tokens=0, usage=None, has_choices=False, begins_answer=True, finished=False):
        self.data = data
        self.kind = kind
        self.tokens = tokens
        self.usage = usage
        self.has_choices = has_choices
        self.begins_answer = begins_answer
        self.finished = finished  # a choice carries a finish_reason: the answer is complete

    def __repr__(self):
        return f"Event({self.kind}, tokens={self.tokens}, {self.data[:40]!r})"


def classify(data: bytes) -> Event:
    if data == DONE_PAYLOAD:
        return Event(data, DONE)
    try:
        chunk = _fast_loads(data)
    except ValueError:
        try:
            chunk = json.loads(data)
        except ValueError:
            return Event(data, INVALID)
    return classified(data, chunk)


def classified(data: bytes, chunk) -> Event:
    """The Event of a payload (not [DONE]) whose JSON is `chunk`."""
    if not isinstance(chunk, dict):
        return Event(data, INVALID)
    if "error" in chunk:
        return Event(data, ERROR)
    usage = chunk.get("usage") or None
    if not isinstance(usage, dict):
        usage = None
    choices = chunk.get("choices")
    tokens = 0
    begins = usage is not None
    finished = False
    if choices and isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            tokens += choice_tokens(choice)
            if choice.get("finish_reason"):
                begins = finished = True
        return Event(data, CHUNK, tokens, usage, True, begins or tokens > 0, finished)
    return Event(data, CHUNK, 0, usage, False, begins)


def choice_tokens(choice: dict) -> int:
    """The completion tokens one choice of a chunk carries (its delta's text, tool and function calls): a chunk's
    `tokens` are its choices' sum; the relay meters each choice of n > 1 against its own max_tokens."""
    delta = choice.get("delta")
    if not isinstance(delta, dict) or not delta:
        return 0
    tokens = 0
    for name in TEXT_FIELDS:
        text = delta.get(name)
        if text:
            tokens += chunk_tokens(text) if isinstance(text, str) else 1
    calls = delta.get("tool_calls")
    if calls:
        for call in calls if isinstance(calls, list) else (calls,):
            tokens += _call_tokens(call.get("function") if isinstance(call, dict) else None)
    if delta.get("function_call"):
        tokens += _call_tokens(delta["function_call"])
    return tokens


def _call_tokens(function) -> int:
    """A tool or function call delta: the tokens of its name and of the piece of its arguments it carries, at least
    one (the delta that opens a call may carry only its id)."""
    if not isinstance(function, dict):
        return 1
    return max(1, sum(chunk_tokens(part) for part in (function.get("name"), function.get("arguments"))
                      if isinstance(part, str) and part))


class SSEParser:
    """Feed it the body's bytes as they come; it returns the `data` payloads of the events each piece completed."""

    def __init__(self):
        self._rest = b""  # an event's beginning, waiting for its end

    def feed(self, piece: bytes) -> list[bytes]:
        if not self._rest and piece.find(b"\n") == len(piece) - 2 and piece.startswith(b"data:") and (
                piece[-1] == 10 and piece[-3] != 13):
            # The common piece, one provider write of one event: `data: {...}` and its blank line, no other line
            # break and no CRLF. What the general path below makes of it, with less work per paced token.
            return [piece[5:-2].strip()]
        return self._split(piece)

    def _split(self, piece: bytes) -> list[bytes]:
        data = self._rest + piece if self._rest else piece
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        *events, self._rest = data.split(b"\n\n")
        payloads = []
        for event in events:
            if event.startswith(b"data:") and b"\n" not in event:  # the usual one-line event
                payloads.append(event[5:].strip())
            else:
                # Several data lines make one payload, joined by newlines (the SSE spec); comments and other
                # fields (event:, id:, retry:) carry nothing Sluice relays.
                lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
                if lines:
                    payloads.append(b"\n".join(lines))
        return payloads
