"""Validation of /v1/chat/completions bodies: a clear OpenAI-style 400 for every mistake in what Sluice reads, and every
other field passed to the provider untouched (issue 16): the provider judges what it takes."""

import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from django.conf import settings

from quotas.domain.exceptions import ModelNotAllowed
from quotas.models import Usage
from streaming.errors import ApiError, invalid

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
# The fields Sluice reads, type-checked here. Every other field (temperature, tools, an SDK's newest field, a vLLM or
# Ollama `extra_body` field) is forwarded untouched: the provider judges it, and its refusal reaches the client as its
# own 400 (`upstream_rejected`). An operator may deny or strip fields per model (SLUICE_FIELD_RULES, `field_rules`).
INTERPRETED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                                "n"})
TOKEN_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
# OpenAI's own bound on `n`; it also bounds the reservation (n x the completion budget).
MAX_CHOICES = 128
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object",
              bool: "a boolean"}
# Deeper than any real request: a JSON schema in `tools` or `response_format` nests a few dozen levels at most (OpenAI's
# structured outputs allow 10 schema levels). The body is walked and re-serialised for the provider; past this it is
# refused, and far past it (thousands of levels) the JSON parser itself gives up.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ChatRequest:
    model: str
    messages: list
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_tokens: int | None  # per choice
    options: dict  # every field Sluice does not interpret (and `n`), forwarded untouched
    raw_fields: frozenset = frozenset()  # the body's fields, after the operator's field rules
    choices: int = 1  # n
    stream_options: dict | None = None  # the client's, merged into Sluice's own
    limit_fields: tuple = ()  # the token-limit fields the client set: the clamped limit goes in those


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
    body = _load_json(_read_body(request))
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    _inspect(body)
    return body


def _read_body(request) -> bytes:
    limit = settings.SLUICE_MAX_BODY_BYTES
    too_large = ApiError(f"Request body is larger than {limit} bytes.", status=413, code="request_too_large")
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)  # not request.headers: it copies every header
    except ValueError:  # duplicated or malformed: the body's own size is checked below
        length = 0
    if length > limit:
        raise too_large
    # Read once, then close the request's body (HttpRequest.read, .close): `request.body` would keep the whole body
    # — a conversation, often tens of kilobytes — for as long as the answer streams, in the request and in the ASGI
    # handler's body file (docs/performance.md, "A request's body"). Nothing reads it again: the parsed body is what
    # the view uses, and the provider is sent its own serialisation.
    most = limit if settings.DATA_UPLOAD_MAX_MEMORY_SIZE is None else min(limit, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    try:
        body = request.read(most + 1)
    finally:
        request.close()
    if len(body) > most:  # sent chunked, or with an understated length
        raise too_large
    return body


def _load_json(raw: bytes):
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request.", code="invalid_json") from None


def _refuse_constant(name):
    # Python's parser accepts NaN and ±Infinity, which JSON does not have; no provider takes them either.
    raise invalid(f"The JSON body contains {name}, which is not a JSON number: numbers must be finite.",
                  code="invalid_json")


def _finite_float(literal):
    value = float(literal)
    if not math.isfinite(value):  # 1e309: valid JSON, but beyond what a double (or any provider) holds
        raise invalid(f"The JSON body contains the number {literal[:40]}, which is too large: numbers must be finite.",
                      code="invalid_value")
    return value


def _too_deep():
    return invalid(f"The JSON body is nested too deeply (more than {MAX_DEPTH} levels).", code="invalid_json")


class _Refused(Exception):
    """A value deep in the body is refused: its path is collected on the way back up (none is built otherwise)."""

    def __init__(self, error):
        self.error, self.path = error, []


def _inspect(body):
    """Refuse nesting past MAX_DEPTH and lone surrogates in any string or key, naming where."""
    try:
        _inspect_value(body, 1)
    except _Refused as refused:
        param = _param(reversed(refused.path))
        error = refused.error
        if error.code == "invalid_value":
            error.param = param
            error.message = f"Invalid value for '{param or 'the body'}': {error.message}"
        raise error from None


def _inspect_value(value, depth):
    if isinstance(value, str):
        _check_string(value)
        return
    if depth > MAX_DEPTH:
        raise _Refused(_too_deep())
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str):
            _check_string(key, "a key of this object")
        if isinstance(item, (str, dict, list)):
            try:
                _inspect_value(item, depth + 1)
            except _Refused as refused:
                refused.path.append(key)
                raise


def _check_string(text, what="the string"):
    # A lone surrogate (\ud800 with no partner) decodes into a Python str but has no UTF-8 form: the provider call
    # would fail on it.
    if not text.isascii() and (found := _SURROGATE.search(text)):
        raise _Refused(invalid(f"{what} contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x}), "
                               "which is not valid Unicode.", code="invalid_value"))


def _param(path):
    """messages[0].content from ("messages", 0, "content")."""
    param = ""
    for part in path:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    return param or None


def parse_chat_request(body: dict, rules: dict | None = None) -> ChatRequest:
    """`rules`: the operator's field rules (SLUICE_FIELD_RULES when None)."""
    if "model" not in body:
        raise invalid("You must provide a model parameter.", param="model", code="missing_required_parameter")
    _expect(body["model"], str, "model")
    _check_model_name(body["model"])
    body = field_rules(body, settings.SLUICE_FIELD_RULES if rules is None else rules)
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
        if role is not None:
            _expect(role, str, f"{param}.role")  # a list or an object cannot even be looked up in ROLES
        if role not in ROLES:
            raise invalid(f"Invalid value for '{param}.role': expected one of {', '.join(sorted(ROLES))}.",
                          param=f"{param}.role", code="invalid_value")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid(f"Invalid type for '{param}.content': expected a string or an array.",
                          param=f"{param}.content", code="invalid_type")
        if isinstance(content, list):
            _check_parts(content, f"{param}.content")
    stream = body.get("stream", False)
    _expect(stream, bool, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        _expect(stream_options, dict, "stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                          code="invalid_value")
        # A boolean, as OpenAI requires: "yes" or 1e-400 would otherwise pass as true, or as false (fuzz finding 1).
        if stream_options.get("include_usage") is not None:
            _expect(stream_options["include_usage"], bool, "stream_options.include_usage")
            include_usage = stream_options["include_usage"]
    max_tokens = None
    limit_fields = []
    for name in TOKEN_LIMIT_FIELDS:
        if body.get(name) is not None:
            _expect(body[name], int, name)
            if body[name] < 1:
                raise invalid(f"'{name}' must be at least 1.", param=name, code="invalid_value")
            # Both given: the smaller one binds.
            max_tokens = body[name] if max_tokens is None else min(max_tokens, body[name])
            limit_fields.append(name)
    choices = body.get("n")
    if choices is None:
        choices = 1
    else:
        _expect(choices, int, "n")
        if not 1 <= choices <= MAX_CHOICES:
            raise invalid(f"Invalid value for 'n': expected an integer from 1 to {MAX_CHOICES}.", param="n",
                          code="invalid_value")
    options = {name: value for name, value in body.items() if name not in INTERPRETED_FIELDS}
    if "n" in body:
        options["n"] = body["n"]
    return ChatRequest(model=body["model"], messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, options=options, raw_fields=frozenset(body), choices=choices,
                       stream_options=stream_options, limit_fields=tuple(limit_fields))


# Never denied nor stripped: a request without them is not a chat completion.
RULE_EXEMPT_FIELDS = frozenset({"model", "messages"})


def field_rules(body: dict, rules: dict) -> dict:
    """The operator's field rules for the body's model, applied: a denied field present is a 400
    `unsupported_parameter` naming it; stripped fields are removed before anything else reads the body.

    `rules` maps a model name or a glob ("*", "gpt-5*") to {"deny": [...], "strip": [...]}; every entry matching the
    model applies. Pure (the rules are an argument), so that they can come from elsewhere than settings."""
    model = body["model"]
    deny, strip = set(), set()
    for pattern, rule in rules.items():
        if fnmatchcase(model, pattern):
            deny.update(rule.get("deny", ()))
            strip.update(rule.get("strip", ()))
    if denied := sorted(deny & body.keys()):
        raise invalid(f"Unsupported parameter: '{denied[0]}' is not supported with this model.", param=denied[0],
                      code="unsupported_parameter")
    if strip & body.keys():
        return {name: value for name, value in body.items() if name not in strip}
    return body


def field_rules_problem(rules) -> str | None:
    """What is wrong with a SLUICE_FIELD_RULES value, or None (streaming/checks.py: sluice.E010)."""
    if not isinstance(rules, dict):
        return "it must be a JSON object mapping a model name (or a glob such as \"*\") to a rule"
    for pattern, rule in rules.items():
        if not isinstance(rule, dict) or set(rule) - {"deny", "strip"}:
            return f"the rule for {pattern!r} must be an object with \"deny\" and/or \"strip\" lists"
        for kind, names in rule.items():
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                return f"{kind!r} for {pattern!r} must be a list of field names"
            if exempt := RULE_EXEMPT_FIELDS & set(names):
                return f"{kind!r} for {pattern!r} names {sorted(exempt)[0]!r}, which every request needs"
    return None


def _check_model_name(model):
    """A name no configured model has and no ledger row can hold (NUL, which PostgreSQL refuses in text; longer than
    the column): refused as unknown here, since the refusal's ledger row names the model."""
    if "\x00" in model or len(model) > Usage._meta.get_field("model").max_length:
        raise ModelNotAllowed(model)


def _check_parts(parts, param):
    """Content parts: objects with a string `type`; a text part's `text` is a string. Other types pass through (the
    provider knows which it supports)."""
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        _expect(part, dict, where)
        for name in ("type", "text") if part.get("type") == "text" else ("type",):
            if name not in part:
                raise invalid(f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}",
                              code="missing_required_parameter")
            _expect(part[name], str, f"{where}.{name}")
