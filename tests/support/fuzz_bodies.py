"""The fuzz suite's bodies (tests/streaming/gateway/test_fuzz.py): hypothesis strategies for hostile JSON and chat
requests, and the oracles its answers are judged by (OpenAI's error JSON; the OpenAPI document's own schema).

Bodies are built as JSON text by `encode`, not json.dumps: a fuzzed body must be able to hold what Python's encoder
refuses or rewrites (`1e309`, a 5,000-digit integer, a lone surrogate as raw bytes, `NaN`).
"""

import copy
import json
import math
from dataclasses import dataclass

import httpx2
from hypothesis import strategies as st

from streaming.gateway.validation import INTERPRETED_FIELDS, MAX_DEPTH, ROLES
from streaming.gateway.views import OPENAPI_DOCUMENT
from tests.support.gateways import sign_in

JSON_PREFIXES = ("/v1/", "/api/")
ERROR_FIELDS = {"message", "type", "param", "code"}


# JSON text, hostile included ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written as given: a number Python would not write (`1e309`, `NaN`, 5,000 digits)."""

    text: str


@dataclass(frozen=True)
class Utf8:
    """A string written as raw UTF-8 rather than \\u escapes (a lone surrogate becomes bytes that are not UTF-8)."""

    text: str


def encode(value) -> bytes:
    """JSON bytes for a tree of dicts, lists, str, Utf8, Raw, numbers, booleans and None."""
    return _encode(value).encode("utf-8", "surrogatepass")


def _encode(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Utf8):
        return json.dumps(value.text, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_encode(key)}: {_encode(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_encode(item) for item in value) + "]"
    return json.dumps(value)


# Leaves: what JSON holds, and what it should not.
HOSTILE_NUMBERS = st.one_of(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1E400", "1e-400", "-0", "0.0e0", "1.0",
                     "123456789012345678901234567890"]).map(Raw),
    st.sampled_from([400, 4301, 5000]).map(lambda digits: Raw("9" * digits)),  # Python refuses over 4,300 digits
    st.sampled_from([400]).map(lambda zeros: Raw("0." + "0" * zeros + "1")),
)
HOSTILE_STRINGS = st.one_of(
    st.sampled_from(["", "\ud800", "a\udfffb", "\ude00\ud83d", "\ud83d\ude00", "\x00", "sim-small\x00", "\u2028\u2029",
                     "\ufeff", "\\", '"', "</script>", "%00", "\r\n\r\nHTTP/1.1 200 OK", "sim-small ", "SIM-SMALL"]),
    st.sampled_from([101, 70_000]).map(lambda length: "x" * length),
)
SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
STRINGS = st.one_of(st.text(max_size=20), HOSTILE_STRINGS, SURROGATES, st.text(max_size=8).map(Utf8),
                    SURROGATES.map(Utf8))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                   HOSTILE_NUMBERS, STRINGS)
TREES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.one_of(st.text(max_size=8), HOSTILE_STRINGS, SURROGATES), children,
                                       max_size=4), max_leaves=12)


def nested(depth: int, leaf="1", kind="["):
    """`depth` levels of arrays or objects around `leaf`, as Raw JSON."""
    if kind == "[":
        return Raw("[" * depth + leaf + "]" * depth)
    return Raw('{"a": ' * depth + leaf + "}" * depth)


DEEP = st.builds(nested, st.one_of(st.integers(60, 70), st.sampled_from([200, 5_000, 100_000])),
                 kind=st.sampled_from(["[", "{"]))

# A chat request: valid, then broken in a few places (a field, a message, a content part; a value swapped for a
# hostile one, a required field dropped, an unknown one added), so that most examples get past the first check and
# some pass them all and reach the provider.
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"),
                                    "image_url": st.fixed_dictionaries({"url": st.just("https://x.test/a.png")})})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(sorted(ROLES))},
    optional={"content": st.one_of(st.text(max_size=20), st.none(), st.lists(st.one_of(TEXT_PART, IMAGE_PART),
                                                                             max_size=3))})
PLAUSIBLE = {
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "n": st.integers(1, 3),
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "stop": st.lists(st.text(max_size=4), max_size=4),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 100).map(str), st.integers(-100, 100), max_size=2),
    "user": st.text(max_size=10), "seed": st.integers(),
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    "tool_choice": st.sampled_from(["none", "auto", "required"]), "response_format": st.just({"type": "text"}),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "parallel_tool_calls": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]), "service_tier": st.just("auto"),
    "store": st.booleans(),
    # Fields Sluice does not read, forwarded untouched (issue 16): a few the SDK types and a few of vLLM's extra_body.
    "prediction": st.just({"type": "content", "content": "x"}), "modalities": st.just(["text"]),
    "verbosity": st.sampled_from(["low", "high"]), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "chat_template_kwargs": st.dictionaries(st.text(max_size=8), st.booleans(), max_size=2),
}
assert INTERPRETED_FIELDS - {"model", "messages"} <= set(PLAUSIBLE), "a chat field without a plausible value"
MUTANTS = st.one_of(TREES, HOSTILE_NUMBERS, HOSTILE_STRINGS, SURROGATES, SURROGATES.map(Utf8), DEEP)


@st.composite
def chat_bodies(draw):
    body = {"model": draw(st.sampled_from(["sim-small", "sim-large"])),
            "messages": draw(st.lists(MESSAGE, min_size=1, max_size=3))}
    for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True)):
        body[name] = draw(PLAUSIBLE[name])
    if "stream_options" in body:
        body["stream"] = True
    body = copy.deepcopy(body)  # st.just() values are shared between examples: mutate copies only
    for _ in range(draw(st.integers(0, 2))):
        _mutate(draw, body)
    return body


# Names to add where a mutation adds a key: the ones the gateway reads at any depth, and a stranger.
NAMES = st.one_of(st.sampled_from(sorted(INTERPRETED_FIELDS | set(PLAUSIBLE) | {
    "include_usage", "role", "content", "type", "text", "name", "tool_calls", "tool_call_id", "image_url", "url"})),
    STRINGS)


def _mutate(draw, body):
    """One change anywhere in the body's tree: a value swapped for a hostile one, a key dropped, or a key added."""
    places = list(_places(body))
    container, key = places[draw(st.sampled_from(range(len(places))))]
    action = draw(st.sampled_from(["swap", "swap", "swap", "drop", "add"]))
    if action == "add" and isinstance(container, dict):
        container[draw(NAMES)] = draw(MUTANTS)
    elif action == "drop" and isinstance(container, dict):
        del container[key]
    else:
        container[key] = draw(MUTANTS)


def _places(value):
    """(container, key) for every value in the tree, the top-level fields first."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in list(items):
        yield value, key
        if isinstance(item, (dict, list)) and item:
            yield from _places(item)


BODIES = st.one_of(
    chat_bodies().map(encode),
    chat_bodies().map(encode),
    chat_bodies().map(encode),
    TREES.map(encode),
    DEEP.map(encode),
    st.binary(max_size=64),
    st.sampled_from([b"", b" ", b"\xef\xbb\xbf{}", b'{"model": "sim-small"', b"{" * 3, b"\x00", b"null", b"[]",
                     '{"model": "\udc00"}'.encode("utf-8", "surrogatepass"), b"\xff\xfe{\x00}\x00"]),
)


# Oracles --------------------------------------------------------------------------------------------------------


def _document_request_validator():
    """A validator of chat request bodies by the OpenAPI document's own schema (ChatCompletionRequest).

    With one reading JSON Schema does not have: an integer is written without a fraction (`2`, not `2.0`, which
    JSON Schema counts as an integer), as OpenAI and the gateway read it."""
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    document = json.loads(OPENAPI_DOCUMENT.read_text())
    registry = Registry().with_resource("urn:sluice:openapi", DRAFT202012.create_resource(document))
    integers = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool))
    validator = validators.extend(Draft202012Validator, type_checker=integers)
    return validator({"$ref": "urn:sluice:openapi#/components/schemas/ChatCompletionRequest"}, registry=registry)


DOCUMENT_REQUEST = _document_request_validator()


def document_verdict(raw: bytes):
    """True or False: the document's schema accepts or refuses this body. None: the body is not JSON a provider can
    take (not JSON, `NaN`, `1e309`, a lone surrogate, nesting past 64), which the document states in words and the
    gateway refuses before any schema applies."""

    def refuse(_):
        raise ValueError

    def finite(literal):
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError
        return value

    try:
        body = json.loads(raw, parse_constant=refuse, parse_float=finite)
    except (ValueError, RecursionError):
        return None
    if _deeper_than(body, MAX_DEPTH) or _has_surrogate(body):
        return None
    return DOCUMENT_REQUEST.is_valid(body)


def _deeper_than(value, limit, depth=1):
    if not isinstance(value, (dict, list)):
        return False
    if depth > limit:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(_deeper_than(item, limit, depth + 1) for item in items)


def _has_surrogate(value):
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False


def assert_openai_error(status, content_type, body: bytes, where=""):
    """The refusal is OpenAI's error object, with a JSON content type."""
    assert (content_type or "").split(";")[0].strip() == "application/json", (where, status, content_type, body[:300])
    try:
        payload = json.loads(body)
    except ValueError:
        raise AssertionError((where, status, "not JSON", body[:300])) from None
    assert isinstance(payload, dict) and set(payload) == {"error"}, (where, status, body[:300])
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, (where, status, body[:300])
    assert isinstance(error["message"], str) and error["message"], (where, status, body[:300])
    assert isinstance(error["type"], str) and (error["code"] is None or isinstance(error["code"], str))
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def assert_answer(path, status, content_type, body: bytes, where=""):
    """No 5xx; under /v1/ and /api/ a refusal is OpenAI's error JSON, and a completion ends as a completion should."""
    where = where or path
    assert status < 500, (where, status, content_type, body[:500])
    if not path.startswith(JSON_PREFIXES):
        return
    if status >= 400:
        assert_openai_error(status, content_type, body, where)
        return
    media_type = (content_type or "").split(";")[0].strip()
    if media_type == "text/event-stream":
        # A stream from a healthy provider ends with [DONE], with no error event on the way.
        events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", (where, body[-500:])
        assert not any(b'"error"' in event[:12] for event in events), (where, body[-500:])
    elif status != 204 and body:
        assert media_type == "application/json", (where, status, content_type, body[:300])
        json.loads(body)


# The demo's session ---------------------------------------------------------------------------------------------


class Surface:
    """Posts raw bodies to /v1/chat/completions with an API key, or to the demo's /api/chat with a session: they share
    validation.parse_body and the error handling."""

    def __init__(self, gateway, account, name):
        self.gateway, self.name = gateway, name
        self.http = httpx2.Client(base_url=gateway.base_url, timeout=30)
        if name == "api":
            self.path, self.headers = "/v1/chat/completions", {"Authorization": f"Bearer {account.key}"}
        else:
            self.path, self.headers = "/api/chat", {"X-CSRFToken": sign_in(self.http, account.user.username)}

    def post(self, body: bytes, **headers):
        return self.http.post(self.path, content=body,
                              headers={**self.headers, "Content-Type": "application/json", **headers})
