"""The Responses API (`POST /v1/responses`): a completion whose provider serves `/responses`, through chat's lifecycle.

The same admission, leases, mid-stream ceiling, backpressure, stall cut-off, disconnect handling and ledger row
(completion.py, relay.py). What differs:

- the prompt is the instructions and the input items, counted from their text (prompts.py);
- the clamped budget goes in `max_output_tokens`;
- the stream is classified by a `ResponseEvents` of its own (streaming/provider/response_events.py), which meters the
  output text, refusal, reasoning and tool-argument deltas and finds the usage in `response.completed`;
- the events Sluice writes itself are the Responses API's. A stream Sluice cuts (the quota ran out, the provider failed
  or went silent, the server is restarting) ends with an `error` event, which the official SDKs raise as `APIError`
  as they do chat's error event, then the response's last state, `response.failed`, with the error's code
  (`insufficient_quota`, `upstream_error`, …), so that clients reading the final state (Codex) see why. A provider
  that streams past max_output_tokens is ended with `response.incomplete` (`incomplete_details.reason:
  "max_output_tokens"`). Both carry the provider's response id (the SDK's stream helper checks it), the sequence
  numbers that follow the provider's, the output items it completed, and Sluice's count of the usage.
"""

import json
import time

from streaming.provider.endpoints import Endpoint
from streaming.provider.response_events import ResponseEvents

from .completion import Completion
from .prompts import count_responses_input
from .relay import Relay

# OpenAI refuses a max_output_tokens below 16: a budget clamped lower is sent as 16, and the relay ends the stream at
# the budget itself.
MIN_OUTPUT_TOKENS = 16


class ResponsesCompletion(Completion):
    def __init__(self, caller, request, route):
        super().__init__(caller, request, route)  # request: streaming.gateway.bodies.ResponsesRequest
        self.classifier = ResponseEvents()
        self.endpoint = Endpoint("/responses", self.classifier)

    async def _count_prompt(self) -> int:
        return await count_responses_input(self.chat.instructions, self.chat.input)

    def _prompt_sent(self):
        """Kept: the input is among the request's forwarded fields (`options`), which nothing else owns."""

    def _provider_body(self, target):
        request = self.chat
        body = {**request.options, "model": request.model}
        budget = self.lease.max_tokens
        if budget < MIN_OUTPUT_TOKENS and (request.max_tokens is None or request.max_tokens >= MIN_OUTPUT_TOKENS):
            budget = MIN_OUTPUT_TOKENS
        body["max_output_tokens"] = budget
        if request.stream:
            body["stream"] = True
        return body

    def _relay(self, events, **options) -> Relay:
        return ResponsesRelay(events, classifier=self.classifier, model=self.chat.model, **options)


class ResponsesRelay(Relay):
    HEAD = b""  # each Event's data holds its own `event:` and `data:` lines (response_events.py)

    def __init__(self, events, *, classifier: ResponseEvents, model: str, **options):
        super().__init__(events, **options)
        self.classifier = classifier
        self.model = model

    def _ending(self) -> bytes:
        return b""  # the provider's last event (response.completed) was the end: this API has no [DONE]

    def _overrun(self) -> bytes:
        return self._final("incomplete", incomplete_details={"reason": "max_output_tokens"})

    def _error_event(self, error) -> bytes:
        fields = {"code": error.code, "message": error.message, "param": error.param}
        # The error's fields at the top, as OpenAI documents the event, and under `error`, as OpenAI sends it: the SDKs
        # raise an event with an `error` object as APIError.
        return (self._event("error", {**fields, "error": {"type": error.type, **fields}})
                + self._final("failed", error={"code": error.code, "message": error.message}))

    def _final(self, status, **fields) -> bytes:
        """The response's last state, from the provider's response object (its id, model, echoed settings)."""
        response = dict(self.classifier.response or {
            "id": "resp_" + self.request_id.removeprefix("req_"), "object": "response",
            "created_at": int(time.time()), "model": self.model})
        prompt, completion = self.prompt_tokens, self.figures.completion_tokens
        response.update({
            "status": status, "error": None, "incomplete_details": None,
            "output": [item for _, item in sorted(self.classifier.output.items())],
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion},
            **fields})
        return self._event(f"response.{status}", {"response": response})

    def _event(self, kind, fields) -> bytes:
        payload = {"type": kind, "sequence_number": self.classifier.next_sequence_number(), **fields}
        return (b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload, separators=(",", ":")).encode()
                + b"\n\n")
