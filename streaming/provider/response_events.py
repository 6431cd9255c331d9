"""The Responses API's stream (`POST /responses` with `stream: true`), classified for the relay.

Where chat streams one kind of chunk, the Responses API streams typed events: each payload's `type` names it (and an
`event:` line repeats the name), every one carries a `sequence_number`, and the stream ends with the response's last
state, `response.completed` (or `response.incomplete`), holding its usage, without `[DONE]`:

    response.created → response.in_progress → response.output_item.added → response.content_part.added →
    response.output_text.delta … → response.output_text.done → … → response.output_item.done → response.completed

A classifier per stream (`ResponseEvents`), because the events Sluice writes itself when it cuts a stream must continue
it: the provider's response object (the client's SDK checks that the final event names the response it was created
with), the next sequence number, the output items completed so far. Reading them off the events it classifies anyway
costs nothing more than the JSON parse every event needs.
"""

import json

from quotas.domain.policy import chunk_tokens

from .events import CHUNK, DONE, DONE_PAYLOAD, ERROR, INVALID, Event

# Deltas of what the provider bills as output tokens: the answer, a refusal, reasoning (its text, as open models
# stream it, or its summary, as OpenAI's do) and what the model writes for a tool (a function's arguments, a custom
# tool's input, code for the interpreter, an MCP call's arguments).
METERED_DELTAS = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta", "response.code_interpreter_call_code.delta",
    "response.mcp_call_arguments.delta",
})
# The response's last state: the answer is complete (an incomplete one stopped at its max_output_tokens or a content
# filter, which is still the provider's whole answer).
ENDINGS = frozenset({"response.completed", "response.incomplete"})
# The provider failed: the relay ends the stream with its own error events (relay.py).
FAILURES = frozenset({"error", "response.failed"})
LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress"})


class ResponseEvents:
    """`classifier(payload) → Event`, for one stream. Each Event's `data` is the event as the client gets it, its
    `event:` line and its `data:` line (the Responses relay writes no prefix of its own: streaming/streams/
    responses.py)."""

    def __init__(self):
        self.response = None  # the provider's response object, from its response.created (or in_progress)
        self.sequence_number = -1  # the last one the provider sent
        self.output = {}  # output_index → the output item, once done

    def next_sequence_number(self) -> int:
        self.sequence_number += 1
        return self.sequence_number

    def __call__(self, data: bytes) -> Event:
        if data == DONE_PAYLOAD:  # not the Responses API's, but some compatible servers end with it
            return Event(data, DONE)
        try:
            payload = json.loads(data)
        except ValueError:
            return Event(data, INVALID)
        if not isinstance(payload, dict):
            return Event(data, INVALID)
        kind = payload.get("type")
        if not isinstance(kind, str):  # a list would not even be looked up in the sets below
            kind = None
        number = payload.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self.sequence_number = number
        framed = _framed(kind, data)
        if kind in METERED_DELTAS:
            delta = payload.get("delta")
            tokens = (chunk_tokens(delta) if isinstance(delta, str) else 1) if delta else 0
            return Event(framed, CHUNK, tokens, None, False, tokens > 0)
        if kind in ENDINGS:
            response = payload.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            return Event(framed, CHUNK, 0, usage if isinstance(usage, dict) else None, False, True, True)
        if kind in FAILURES or (kind is None and "error" in payload):
            return Event(framed, ERROR)
        if kind in LIFECYCLE and isinstance(payload.get("response"), dict):
            self.response = payload["response"]
        elif kind == "response.output_item.done":
            index, item = payload.get("output_index"), payload.get("item")
            if isinstance(index, int) and isinstance(item, dict):
                self.output[index] = item
        return Event(framed, CHUNK, 0, None, False, False)


def _framed(kind, data: bytes) -> bytes:
    """The event's lines, without the blank line that ends it: `event: <type>` (when the type can be written on one
    line) and its data."""
    if b"\n" in data:  # a payload the provider wrote over several data: lines (joined by SSEParser)
        data = data.replace(b"\n", b"\ndata: ")
    if kind is not None and kind.isprintable():
        return b"event: " + kind.encode() + b"\ndata: " + data
    return b"data: " + data
