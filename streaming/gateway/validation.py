"""Validation of /v1/chat/completions bodies: a clear OpenAI-style 400 for every mistake."""

import json
from dataclasses import dataclass

from django.conf import settings

from streaming.errors import ApiError, invalid

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
# Passed to the provider as given, after a type check.
OPTIONAL_FIELDS = {
    "temperature": (int, float), "top_p": (int, float), "n": int, "stop": (str, list),
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "logit_bias": dict,
    "user": str, "seed": int, "tools": list, "tool_choice": (str, dict), "response_format": dict,
    "logprobs": bool, "top_logprobs": int, "parallel_tool_calls": bool, "metadata": dict,
    "reasoning_effort": str, "service_tier": str, "store": bool,
}
KNOWN_FIELDS = set(OPTIONAL_FIELDS) | {"model", "messages", "stream", "stream_options", "max_tokens",
                                       "max_completion_tokens"}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object",
              bool: "a boolean"}


@dataclass
class ChatRequest:
    model: str
    messages: list
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_tokens: int | None
    options: dict  # other fields, forwarded
    raw_fields: frozenset = frozenset()


def _expect(value, types, param):
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(TYPE_NAMES[t] for t in types)
        raise invalid(f"Invalid type for '{param}': expected {names}.", param=param, code="invalid_type")


def parse_body(request) -> dict:
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise ApiError("Content-Type must be application/json.", status=415, param=None, code="unsupported_media_type")
    length = int(request.headers.get("Content-Length") or 0)
    if length > settings.SLUICE_MAX_BODY_BYTES or len(request.body) > settings.SLUICE_MAX_BODY_BYTES:
        raise ApiError(f"Request body is larger than {settings.SLUICE_MAX_BODY_BYTES} bytes.", status=413,
                       code="request_too_large")
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request.", code="invalid_json")
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return body


def parse_chat_request(body: dict) -> ChatRequest:
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                      code="unknown_parameter")
    if "model" not in body:
        raise invalid("You must provide a model parameter.", param="model", code="missing_required_parameter")
    _expect(body["model"], str, "model")
    if "messages" not in body:
        raise invalid("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    _expect(messages, list, "messages")
    if not messages:
        raise invalid("'messages' must contain at least one message.", param="messages", code="empty_array")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        _expect(message, dict, param)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"Invalid value for '{param}.role': expected one of {', '.join(sorted(ROLES))}.",
                          param=f"{param}.role", code="invalid_value")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid(f"Invalid type for '{param}.content': expected a string or an array.",
                          param=f"{param}.content", code="invalid_type")
    stream = body.get("stream", False)
    _expect(stream, bool, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        _expect(stream_options, dict, "stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                          code="invalid_value")
    include_usage = bool((stream_options or {}).get("include_usage"))
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            _expect(body[name], int, name)
            if body[name] < 1:
                raise invalid(f"'{name}' must be at least 1.", param=name, code="invalid_value")
            max_tokens = body[name]
    options = {}
    for name, types in OPTIONAL_FIELDS.items():
        if body.get(name) is not None:
            _expect(body[name], types, name)
            options[name] = body[name]
    if options.get("n", 1) != 1:
        raise invalid("Only n=1 is supported.", param="n", code="invalid_value")
    return ChatRequest(model=body["model"], messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, options=options, raw_fields=frozenset(body))
