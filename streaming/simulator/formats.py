"""The simulated provider's other endpoints, as OpenAI writes them: the Responses API, the legacy text completions,
embeddings and one model (chat completions are app.py's own).

Pure: what each request and answer looks like. app.py serves them with chat's switches, pace and records (a format
gives it its opening events, one event per token, its closing events, and the answer when not streamed).

A format refuses a body the real endpoint would refuse (for Sluice to pass the provider's 400 on) with ValueError.
Embeddings are deterministic: each input's vector is drawn from a hash of the model and the input, `dimensions` long
(default 64), unit length; `encoding_format: "base64"` (the official SDK's default) packs it as little-endian float32.
"""

import base64
import hashlib
import json
import math
import struct
import time

MODELS = ("sim-small", "sim-large")
DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 3072  # text-embedding-3-large's
MAX_CHOICES = 128 * 128  # /v1/completions: prompts x n, within what Sluice lets through


def model_object(model):
    return {"id": model, "object": "model", "created": 0, "owned_by": "sluice-sim"}


def _event(kind, **fields) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def _data(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _model(request) -> str:
    model = request.get("model")
    if not isinstance(model, str):
        raise ValueError("model must be a string")
    return model


def _int(request, name, default, low, high) -> int:
    value = request.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return value


def _texts(value) -> list:
    """A prompt or an embedding's input as a list of texts: each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [value]
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
               for item in value):
            return value
    raise ValueError("expected a string, strings, token ids or arrays of token ids")


def _size(text, count) -> int:
    return count(text) if isinstance(text, str) else len(text)


class Responses:
    """`POST /responses`: typed events with sequence numbers, ending with response.completed (or .incomplete)."""

    ID_PREFIX = "resp"

    def __init__(self, request, record_id, count, control):
        self.model = _model(request)
        self.stream = request.get("stream") is True
        self.max_tokens = _int(request, "max_output_tokens", None, 1, 2**63)
        self.copies = 1
        instructions, items = request.get("instructions"), request.get("input")
        self.instructions = instructions if isinstance(instructions, str) else None
        # As chat messages: what the demo style answers, and what the prompt's count is made of.
        self.messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + (
            [{"role": "user", "content": items}] if isinstance(items, str) else
            [_as_message(item) for item in items] if isinstance(items, list) else [])
        self.id, self.created = f"resp_{record_id}", int(time.time())
        self.message_id, self.reasoning_id = f"msg_{record_id}", f"rs_{record_id}"
        self.reasoning_tokens, self.cached_tokens = control.reasoning_tokens, control.cached_tokens
        self.cache_write_tokens = control.cache_write_tokens
        self.previous = request.get("previous_response_id")
        self.sequence = 0
        self.prompt_tokens = None  # app.py counts the messages

    def _next(self, kind, **fields) -> bytes:
        event = _event(kind, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def _index(self):
        return 1 if self.reasoning_tokens else 0

    def _reasoning(self):
        return {"id": self.reasoning_id, "type": "reasoning", "summary": []}

    def _message(self, text, status):
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def _response(self, status, output, usage=None, incomplete=None):
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None, "incomplete_details": incomplete,
                "instructions": self.instructions, "max_output_tokens": self.max_tokens, "model": self.model,
                "output": output, "parallel_tool_calls": True,
                "previous_response_id": self.previous if isinstance(self.previous, str) else None,
                "reasoning": {"effort": None, "summary": None}, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage, "metadata": {}}

    def _usage(self, completion_tokens):
        output = completion_tokens + self.reasoning_tokens
        cached = min(self.cached_tokens, self.prompt_tokens)
        details = {"cached_tokens": cached}
        if self.cache_write_tokens:  # part of the prompt's count, as the cached tokens are
            details["cache_write_tokens"] = min(self.cache_write_tokens, self.prompt_tokens - cached)
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": details,
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.prompt_tokens + output}

    def opening(self) -> list[bytes]:
        events = [self._next("response.created", response=self._response("in_progress", [])),
                  self._next("response.in_progress", response=self._response("in_progress", []))]
        if self.reasoning_tokens:  # hidden reasoning, as OpenAI's reasoning models stream it: an item, no text
            events += [self._next("response.output_item.added", output_index=0, item=self._reasoning()),
                       self._next("response.output_item.done", output_index=0, item=self._reasoning())]
        index = self._index()
        return events + [
            self._next("response.output_item.added", output_index=index, item={**self._message("", "in_progress"),
                                                                             "content": []}),
            self._next("response.content_part.added", item_id=self.message_id, output_index=index, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, copy, token, padding) -> bytes:
        fields = {"obfuscation": padding} if padding else {}
        return self._next("response.output_text.delta", item_id=self.message_id, output_index=self._index(),
                          content_index=0, delta=token, logprobs=[], **fields)

    def closing(self, texts, finish, completion_tokens) -> list[bytes]:
        text, index, response = texts[0], self._index(), self.answer(texts, finish, completion_tokens)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [self._next("response.output_text.done", item_id=self.message_id, output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self._next("response.content_part.done", item_id=self.message_id, output_index=index,
                           content_index=0, part=part),
                self._next("response.output_item.done", output_index=index, item=response["output"][-1]),
                self._next(f"response.{response['status']}", response=response)]

    def failure(self) -> bytes:
        """What OpenAI sends when generation fails after the first bytes: an error event, then response.failed."""
        error = {"code": "server_error", "message": "The model failed mid-answer"}
        return (self._next("error", error={**error, "type": "server_error", "param": None}, **error, param=None)
                + self._next("response.failed", response={**self._response("failed", []), "error": error}))

    def answer(self, texts, finish, completion_tokens) -> dict:
        status = "incomplete" if finish == "length" else "completed"
        output = ([self._reasoning()] if self.reasoning_tokens else []) + [self._message(texts[0], status)]
        return self._response(status, output, self._usage(completion_tokens),
                              {"reason": "max_output_tokens"} if status == "incomplete" else None)


def _as_message(item):
    """An input item as a chat message, for the prompt's count (the text it holds, whatever its kind)."""
    if not isinstance(item, dict):
        return {"role": "user", "content": json.dumps(item)}
    content = item.get("content")
    if isinstance(content, list):
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    elif not isinstance(content, str):
        content = " ".join(str(item[name]) for name in ("name", "arguments", "output") if name in item)
    role = item.get("role")
    return {"role": role if isinstance(role, str) else "user", "content": content}


class TextCompletions:
    """`POST /completions`: chat's stream with `choices[].text`; one completion per prompt, n of each."""

    ID_PREFIX = "cmpl"

    def __init__(self, request, record_id, count, control):
        self.model = _model(request)
        self.stream = request.get("stream") is True
        self.max_tokens = _int(request, "max_tokens", 16, 1, 2**63)
        prompts = _texts(request.get("prompt"))
        self.copies = len(prompts) * max(_int(request, "n", 1, 1, 128), _int(request, "best_of", 1, 1, 128))
        if self.copies > MAX_CHOICES:
            raise ValueError("too many completions")
        options = request.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        suffix = request.get("suffix")
        self.prompt_tokens = sum(_size(prompt, count) for prompt in prompts) + (
            count(suffix) if isinstance(suffix, str) else 0)
        self.messages = [{"role": "user", "content": prompt if isinstance(prompt, str) else ""} for prompt in prompts]
        self.id, self.created = f"cmpl-{record_id}", int(time.time())

    def _chunk(self, choices, **fields):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **fields}

    def opening(self) -> list[bytes]:
        return []

    def delta(self, copy, token, padding) -> bytes:
        fields = {"obfuscation": padding} if padding else {}
        return _data(self._chunk([{"text": token, "index": copy, "logprobs": None, "finish_reason": None}], **fields))

    def closing(self, texts, finish, completion_tokens) -> list[bytes]:
        events = [_data(self._chunk([{"text": "", "index": copy, "logprobs": None, "finish_reason": finish}]))
                  for copy in range(self.copies)]
        if self.include_usage:
            events.append(_data(self._chunk([], usage=_usage(self.prompt_tokens, completion_tokens))))
        return events + [b"data: [DONE]\n\n"]

    def failure(self) -> bytes:
        return _data({"error": {"message": "The model failed mid-answer", "type": "server_error", "param": None,
                                "code": "server_error"}})

    def answer(self, texts, finish, completion_tokens) -> dict:
        choices = [{"text": text, "index": copy, "logprobs": None, "finish_reason": finish}
                   for copy, text in enumerate(texts)]
        return self._chunk(choices, usage=_usage(self.prompt_tokens, completion_tokens))


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def embeddings(request, count) -> dict:
    """`POST /embeddings`: one vector per input. Raises ValueError for what OpenAI refuses."""
    model = _model(request)
    inputs = _texts(request.get("input"))
    dimensions = _int(request, "dimensions", DEFAULT_DIMENSIONS, 1, MAX_DIMENSIONS)
    encoding = request.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise ValueError("encoding_format must be float or base64")
    data = []
    for index, text in enumerate(inputs):
        vector = _vector(model, text, dimensions)
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(_size(text, count) for text in inputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _vector(model, text, dimensions) -> list[float]:
    """A unit vector drawn from a hash of the model and the input: the same input, the same vector. A shorter
    `dimensions` gives the longer vector's first values, renormalized (as OpenAI's text-embedding-3 models do)."""
    seed = hashlib.shake_256(json.dumps([model, text]).encode()).digest(4 * dimensions)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", seed)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
