"""Validation of the other endpoints' bodies: /v1/responses, /v1/completions, /v1/embeddings (chat's: validation.py).

Only what Sluice reads is checked, with OpenAI-style 400s: the model, whether to stream, the token limit, and what it
counts (the Responses API's instructions and input, a completion's prompt, an embedding's input). Every other field
is forwarded to the provider untouched, for it to judge (issue 16), but for the operator's field rules
(SLUICE_FIELD_RULES), which are the model's whatever the endpoint: a field denied for a model is refused here as in
chat, and a stripped one is gone before anything reads the body.
"""

from dataclasses import dataclass

from django.conf import settings

from quotas.domain.exceptions import ModelNotAllowed
from quotas.models import Usage
from streaming.errors import invalid

from .validation import field_rules

TYPE_NAMES = {int: "an integer", str: "a string", list: "an array", dict: "an object", bool: "a boolean"}
# OpenAI's default max_tokens for /v1/completions (not chat's: there it is the model's whole budget).
TEXT_COMPLETION_DEFAULT_MAX_TOKENS = 16
# At most this many prompts in one /v1/completions request, and n (best_of) for each: bounds the completions a
# request may ask for at once, and its reservation. OpenAI's bounds for n and best_of.
MAX_PROMPTS = 128
MAX_N = 128
MAX_BEST_OF = 20
# At most this many inputs in one /v1/embeddings request (OpenAI's bound).
MAX_EMBEDDING_INPUTS = 2048


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    stream: bool
    max_tokens: int | None  # max_output_tokens, as the client gave it
    instructions: str | None
    input: object  # a string, an array of input items, or None (a stored prompt's, or a previous response's)
    options: dict  # the body but for model, stream and max_output_tokens: forwarded untouched
    include_usage: bool = True  # the provider's usage (in response.completed) always reaches the client
    choices: int = 1


@dataclass(frozen=True)
class TextCompletionRequest:
    model: str
    prompt: object  # a string, strings, token ids, or arrays of token ids
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    stream_options: dict | None  # the client's, merged into Sluice's own
    max_tokens: int  # for all the completions asked for: each one's max_tokens (16 unless given) times `copies`
    copies: int  # completions asked for: one per prompt, n (or best_of, if more) of each
    echo: bool
    suffix: str | None
    options: dict  # the body but for model, prompt, stream, stream_options and max_tokens: forwarded untouched
    choices: int = 1  # the budget is the whole request's (the relay holds the stream to max_tokens in all)


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    input: object  # a string, strings, token ids, or arrays of token ids
    body: dict  # forwarded untouched
    stream: bool = False
    max_tokens: int | None = None
    include_usage: bool = False
    choices: int = 1


def parse_responses_request(body: dict, rules: dict | None = None) -> ResponsesRequest:
    model = _model(body)
    body = _apply_rules(body, rules)
    stream = _optional(body, "stream", bool, False)
    max_tokens = _token_limit(body, "max_output_tokens")
    instructions = _optional(body, "instructions", str)
    items = body.get("input")
    if items is not None:
        _expect(items, (str, list), "input")
        if isinstance(items, list):
            for i, item in enumerate(items):
                _expect(item, dict, f"input[{i}]")
    background = body.get("background")
    if background is not None and background is not False:  # (0 == False, but is not JSON's false)
        # A background response runs on after the request ends, out of Sluice's sight: nothing would meter it.
        raise invalid("Invalid value for 'background': Sluice serves responses in the request (stream them for long "
                      "ones); background responses are not supported.", param="background", code="invalid_value")
    options = {name: value for name, value in body.items() if name not in ("model", "stream", "max_output_tokens")}
    return ResponsesRequest(model=model, stream=stream, max_tokens=max_tokens, instructions=instructions,
                            input=items, options=options)


def parse_text_completion_request(body: dict, rules: dict | None = None) -> TextCompletionRequest:
    model = _model(body)
    body = _apply_rules(body, rules)
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    prompts = _text_or_tokens(prompt, "prompt", MAX_PROMPTS)
    suffix = _optional(body, "suffix", str)
    echo = _optional(body, "echo", bool, False)
    stream = _optional(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        _expect(stream_options, dict, "stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                          code="invalid_value")
        if stream_options.get("include_usage") is not None:
            _expect(stream_options["include_usage"], bool, "stream_options.include_usage")
            include_usage = stream_options["include_usage"]
    each = _token_limit(body, "max_tokens") or TEXT_COMPLETION_DEFAULT_MAX_TOKENS
    n = _bounded(body, "n", MAX_N)
    best_of = _bounded(body, "best_of", MAX_BEST_OF)
    copies = prompts * max(n, best_of)
    options = {name: value for name, value in body.items()
               if name not in ("model", "prompt", "stream", "stream_options", "max_tokens")}
    return TextCompletionRequest(model=model, prompt=prompt, stream=stream, include_usage=include_usage,
                                 stream_options=stream_options, max_tokens=each * copies, copies=copies, echo=echo,
                                 suffix=suffix, options=options)


def parse_embeddings_request(body: dict, rules: dict | None = None) -> EmbeddingsRequest:
    model = _model(body)
    body = _apply_rules(body, rules)
    if "input" not in body or body["input"] is None:
        raise invalid("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    _text_or_tokens(body["input"], "input", MAX_EMBEDDING_INPUTS)
    return EmbeddingsRequest(model=model, input=body["input"], body=body)


def _model(body) -> str:
    if "model" not in body:
        raise invalid("You must provide a model parameter.", param="model", code="missing_required_parameter")
    model = body["model"]
    _expect(model, str, "model")
    # A name no configured model has and no ledger row can hold (NUL, which PostgreSQL refuses in text; longer than
    # the column): refused as unknown here, since the refusal's ledger row names the model (as validation.py does).
    if "\x00" in model or len(model) > Usage._meta.get_field("model").max_length:
        raise ModelNotAllowed(model)
    return model


def _apply_rules(body, rules) -> dict:
    """The body after the operator's field rules for its model (validation.field_rules; `rules` None:
    SLUICE_FIELD_RULES): chat's rules, so that a field denied or stripped for a model cannot reach its provider through
    another endpoint."""
    return field_rules(body, settings.SLUICE_FIELD_RULES if rules is None else rules)


def _text_or_tokens(value, param, max_items) -> int:
    """A string, an array of strings, an array of token ids (one text, tokenized), or an array of such arrays: how
    many texts it holds. Arrays may not be empty nor mix kinds; at most `max_items` texts."""
    if isinstance(value, str):
        return 1
    _expect(value, (str, list), param)
    if not value:
        raise invalid(f"'{param}' must not be an empty array.", param=param, code="empty_array")
    first = value[0]
    if isinstance(first, int) and not isinstance(first, bool):
        for i, token in enumerate(value):
            _expect(token, int, f"{param}[{i}]")
        return 1
    if len(value) > max_items:
        raise invalid(f"Invalid value for '{param}': at most {max_items} items.", param=param, code="invalid_value")
    if isinstance(first, list):
        for i, tokens in enumerate(value):
            _expect(tokens, list, f"{param}[{i}]")
            for j, token in enumerate(tokens):
                _expect(token, int, f"{param}[{i}][{j}]")
    else:
        for i, text in enumerate(value):
            _expect(text, str, f"{param}[{i}]")
    return len(value)


def _token_limit(body, name) -> int | None:
    value = _optional(body, name, int)
    if value is not None and value < 1:
        raise invalid(f"'{name}' must be at least 1.", param=name, code="invalid_value")
    return value


def _bounded(body, name, most) -> int:
    value = _optional(body, name, int, 1)
    if not 1 <= value <= most:
        raise invalid(f"Invalid value for '{name}': expected an integer from 1 to {most}.", param=name,
                      code="invalid_value")
    return value


def _optional(body, name, types, default=None):
    """A field that may be absent or null (then `default`), else of `types`."""
    value = body.get(name)
    if value is None:
        return default
    _expect(value, types, name)
    return value


def _expect(value, types, param):
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(TYPE_NAMES[t] for t in types)
        raise invalid(f"Invalid type for '{param}': expected {names}.", param=param, code="invalid_type")
