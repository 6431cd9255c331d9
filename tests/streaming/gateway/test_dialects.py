"""Issue 16, item 7: the official SDK, sync and async, through each recorded dialect (tests/support/dialects/, replayed
by the dialect provider as model `replay-<name>`), and what each ending records in the ledger.

The client gets every chunk as the server wrote it (Ollama's tool-call indexes, OpenRouter's reasoning details), the
usage chunk only when it asked (or when the server puts usage in a chunk that also carries a choice, as OpenRouter
does), and Sluice's own usage chunk when it asked and the server sent none. The ledger records the server's usage when
it sent one (`usage_reported`), otherwise Sluice's count: the prompt as estimated (10 tokens for PROMPT) and the
completion as metered.

The Responses API's recordings (`openai-responses*`) go through `POST /v1/responses` with
`responses.create(stream=True)` and the `responses.stream` helper: the client gets every event the server sent, in its
order, and the ledger records the final response's usage with its cached and reasoning details; a stream that ends
without `response.completed` is the provider's failure, which the SDK raises after the events delivered, settled from
Sluice's count.
"""

from dataclasses import dataclass, field

import openai
import pytest
from asgiref.sync import sync_to_async

from quotas.models import Usage
from tests.support.dialects import CORPUS
from tests.support.gateways import gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = [{"role": "user", "content": "Say hello."}]
SLUICE_PROMPT_TOKENS = 10  # 3 to prime the reply, 3 for the message, "user" 1, "Say hello." 3
ANSWER = "Hello! How can I help you today?"
REASONING = "Okay, the user wants a greeting."


@dataclass(frozen=True)
class Dialect:
    name: str
    text: str = ANSWER
    reasoning: str = ""
    calls: tuple = ()  # (index as sent, or None; id; name; arguments), one per call
    usage: tuple | None = None  # the server's (prompt, completion); None: it sends none
    metered: int = 9  # Sluice's count of what was streamed
    usage_beside_a_choice: bool = False  # usage in a chunk that carries a choice: the client gets it, asked or not
    has_json: bool = False  # a non-streaming answer too


PARIS, TOKYO = '{"city": "Paris"}', '{"city": "Tokyo"}'
DIALECTS = [
    Dialect("openai-chat", usage=(10, 9), has_json=True),
    Dialect("openai-tool-calls", text="", usage=(71, 24), metered=16,
            calls=((0, "call_Jd3kX0pQz1VvTt7mW9rN2bYs", "get_weather", PARIS),
                   (1, "call_8hQw2LmZr5TnX1cV0kPj4sDe", "get_weather", TOKYO))),
    Dialect("vllm-reasoning", reasoning=REASONING, usage=(12, 19), metered=17, has_json=True),
    Dialect("ollama-tool-calls", text="", usage=(152, 34), metered=16,
            calls=((0, "call_wteop8bt", "get_weather", PARIS), (0, "call_rk2xye1l", "get_weather", TOKYO))),
    Dialect("ollama-tool-calls-no-index", text="", metered=8,
            calls=((None, "call_hk81qg8b", "get_weather", PARIS),)),
    Dialect("openrouter-reasoning", reasoning=REASONING, usage=(10, 17), metered=17, usage_beside_a_choice=True,
            has_json=True),
    Dialect("no-usage"),
    Dialect("no-done", usage=(10, 9)),
]
BY_NAME = {dialect.name: dialect for dialect in DIALECTS}


@dataclass(frozen=True)
class ResponsesDialect:
    name: str
    text: str = ANSWER
    summary: str = ""  # the reasoning summary streamed
    calls: tuple = ()  # (call_id, name, arguments), one per function call
    usage: tuple | None = None  # the server's (input, cached, output, reasoning); None: no response.completed came
    metered: int = 9  # Sluice's count of what was streamed
    has_json: bool = False


SUMMARY = "**Greeting the user**\n\nThe user asked me to say hello, so I will answer with a short, friendly greeting."
RESPONSES_DIALECTS = [
    ResponsesDialect("openai-responses", usage=(1301, 1280, 9, 0), has_json=True),
    ResponsesDialect("openai-responses-reasoning", summary=SUMMARY, usage=(10, 0, 201, 192), metered=24 + 9),
    ResponsesDialect("openai-responses-function-call", text="", usage=(68, 0, 36, 0), metered=7 + 7,
                     calls=(("call_Xk2q9vLmR4tN8wZ1pJ6sHd3F", "get_weather", '{"location":"Paris, France"}'),
                            ("call_7pQe5YbT0uK3nMx8WcR2zL9A", "get_weather", '{"location":"Tokyo, Japan"}'))),
    ResponsesDialect("openai-responses-no-completed"),
]
RESPONSES_BY_NAME = {dialect.name: dialect for dialect in RESPONSES_DIALECTS}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "strict": True, "description": "Get the current weather.",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def replaying_gateway(dialects, django_db_setup, django_db_blocker):
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS=",".join(f"replay-{d.name}" for d in DIALECTS + RESPONSES_DIALECTS)) as running:
        yield running


@dataclass
class Received:
    """What a client read from a stream: its text, reasoning, tool calls (as sent: index, id, name, arguments),
    finish reasons and usage."""

    text: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)
    finishes: list = field(default_factory=list)
    usage: dict | None = None

    def add(self, chunk):
        raw = chunk.to_dict()
        for choice in raw["choices"]:
            delta = choice.get("delta") or {}
            self.text += delta.get("content") or ""
            self.reasoning += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or ():
                if "id" in call:
                    self.calls.append([call.get("index"), call["id"], call["function"]["name"], ""])
                self.calls[-1][3] += call["function"].get("arguments") or ""
            if choice.get("finish_reason"):
                self.finishes.append(choice["finish_reason"])
        if raw.get("usage"):
            self.usage = raw["usage"]


def check_stream(dialect, received, include_usage):
    assert (received.text, received.reasoning) == (dialect.text, dialect.reasoning)
    assert [tuple(call) for call in received.calls] == list(dialect.calls)
    assert received.finishes == ["tool_calls" if dialect.calls else "stop"]
    if include_usage or dialect.usage_beside_a_choice:
        prompt, completion = dialect.usage or (SLUICE_PROMPT_TOKENS, dialect.metered)
        assert (received.usage["prompt_tokens"], received.usage["completion_tokens"]) == (prompt, completion)
    else:
        assert received.usage is None


def check_ledger(dialect, request_id):
    row = settled_row(request_id)
    prompt, completion = dialect.usage or (SLUICE_PROMPT_TOKENS, dialect.metered)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.usage_reported) == (
        "completed", prompt, completion, dialect.usage is not None)
    assert row.charged_tokens == prompt + completion


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_sync_sdk_streams_each_dialect_with_usage(replaying_gateway, make_user, name):
    dialect = BY_NAME[name]
    api = openai.OpenAI(base_url=replaying_gateway.api_url, api_key=make_user().key, max_retries=0, timeout=30)
    response = api.chat.completions.with_raw_response.create(
        model=f"replay-{name}", messages=PROMPT, stream=True, stream_options={"include_usage": True})
    received = Received()
    for chunk in response.parse():
        received.add(chunk)
    check_stream(dialect, received, include_usage=True)
    check_ledger(dialect, response.headers["x-request-id"])


@pytest.mark.parametrize("name", list(BY_NAME))
async def test_the_async_sdk_streams_each_dialect_without_usage(replaying_gateway, make_user, name):
    dialect = BY_NAME[name]
    caller = await sync_to_async(make_user)()
    async with openai.AsyncOpenAI(base_url=replaying_gateway.api_url, api_key=caller.key, max_retries=0,
                                  timeout=30) as api:
        response = await api.chat.completions.with_raw_response.create(model=f"replay-{name}", messages=PROMPT,
                                                                       stream=True)
        received = Received()
        async for chunk in response.parse():
            received.add(chunk)
    check_stream(dialect, received, include_usage=False)
    await sync_to_async(check_ledger)(dialect, response.headers["x-request-id"])


@pytest.mark.parametrize("name", [d.name for d in DIALECTS if d.has_json])
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_the_sdk_gets_each_dialects_json_answer(replaying_gateway, make_user, name, flavour):
    dialect = BY_NAME[name]
    caller = await sync_to_async(make_user)()
    options = {"base_url": replaying_gateway.api_url, "api_key": caller.key, "max_retries": 0, "timeout": 30}
    if flavour == "sync":
        with openai.OpenAI(**options) as api:
            response = await sync_to_async(api.chat.completions.with_raw_response.create)(
                model=f"replay-{name}", messages=PROMPT)
            completion = response.parse()
    else:
        async with openai.AsyncOpenAI(**options) as api:
            response = await api.chat.completions.with_raw_response.create(model=f"replay-{name}", messages=PROMPT)
            completion = response.parse()
    message = completion.choices[0].message
    assert (message.content, (message.model_extra or {}).get("reasoning", "")) == (dialect.text, dialect.reasoning)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == dialect.usage
    await sync_to_async(check_ledger)(dialect, response.headers["x-request-id"])


# The Responses API. ------------------------------------------------------------------------------------------------


def recorded_types(name):
    """The `event:` names of a recording, in order."""
    return [line.removeprefix("event: ") for line in (CORPUS / f"{name}.sse").read_text().splitlines()
            if line.startswith("event: ")]


@dataclass
class ReceivedEvents:
    """What a client read from a Responses stream: the events' types and sequence numbers, the text, the reasoning
    summary, the function calls (call_id, name, arguments) and the final response."""

    types: list = field(default_factory=list)
    numbers: list = field(default_factory=list)
    text: str = ""
    summary: str = ""
    calls: dict = field(default_factory=dict)  # output_index -> [call_id, name, arguments]
    final: object = None

    def add(self, event):
        self.types.append(event.type)
        self.numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            self.text += event.delta
        elif event.type == "response.reasoning_summary_text.delta":
            self.summary += event.delta
        elif event.type == "response.output_item.added" and event.item.type == "function_call":
            self.calls[event.output_index] = [event.item.call_id, event.item.name, ""]
        elif event.type == "response.function_call_arguments.delta":
            self.calls[event.output_index][2] += event.delta
        elif event.type == "response.completed":
            self.final = event.response


def check_response(dialect, final):
    """The final response, as the client got it (the stream's response.completed, the helper's, or the JSON)."""
    assert final.output_text == dialect.text
    summaries = [part.text for item in final.output if item.type == "reasoning" for part in item.summary]
    assert "".join(summaries) == dialect.summary
    assert [(item.call_id, item.name, item.arguments) for item in final.output
            if item.type == "function_call"] == list(dialect.calls)
    usage = final.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens, usage.output_tokens,
            usage.output_tokens_details.reasoning_tokens) == dialect.usage


def check_responses_ledger(dialect, request_id):
    row = settled_row(request_id)
    if dialect.usage is None:  # cut before the usage: Sluice's count, the provider's failure
        assert (row.status, row.reason, row.prompt_tokens, row.completion_tokens, row.usage_reported) == (
            "upstream_error", "upstream_error", SLUICE_PROMPT_TOKENS, dialect.metered, False)
        assert row.charged_tokens == SLUICE_PROMPT_TOKENS + dialect.metered
        return
    prompt, cached, completion, reasoning = dialect.usage
    assert (row.status, row.stream, row.usage_reported) == ("completed", True, True)
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.reasoning_tokens) == dialect.usage
    assert row.charged_tokens == prompt + completion


def newest_request(user):
    """The request id of the user's latest request (the stream helper does not expose the response's headers)."""
    return Usage.objects.filter(user=user).order_by("-id").values_list("request_id", flat=True).first()


def responses_options(dialect):
    return {"model": f"replay-{dialect.name}", "input": PROMPT[0]["content"],
            **({"tools": [WEATHER_TOOL]} if dialect.calls else {})}


@pytest.mark.parametrize("name", list(RESPONSES_BY_NAME))
def test_the_sdk_streams_each_responses_dialect(replaying_gateway, make_user, name):
    dialect = RESPONSES_BY_NAME[name]
    caller = make_user()
    api = openai.OpenAI(base_url=replaying_gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)
    response = api.responses.with_raw_response.create(**responses_options(dialect), stream=True)
    received = ReceivedEvents()
    if dialect.usage is None:
        with pytest.raises(openai.APIError) as cut:
            for event in response.parse():
                received.add(event)
        assert cut.value.code == "upstream_error"
    else:
        for event in response.parse():
            received.add(event)
        check_response(dialect, received.final)
    # Every event the server sent, in its order and with its numbers (Sluice's error event, raised, comes after).
    assert received.types == recorded_types(name)
    assert received.numbers == list(range(len(received.types)))
    assert (received.text, received.summary) == (dialect.text, dialect.summary)
    assert [tuple(call) for _, call in sorted(received.calls.items())] == list(dialect.calls)
    check_responses_ledger(dialect, response.headers["x-request-id"])
    # The stream helper assembles the same events into the final response.
    with api.responses.stream(**responses_options(dialect)) as stream:
        if dialect.usage is None:
            with pytest.raises(openai.APIError):
                stream.until_done()
            with pytest.raises(RuntimeError, match="response.completed"):
                stream.get_final_response()
        else:
            check_response(dialect, stream.get_final_response())
    check_responses_ledger(dialect, newest_request(caller.user))
    # Every delta is metered (text, summary, arguments): a limit one token short of the answer, which the recording
    # ignores, ends it one delta early with the Responses API's incomplete response, settled from Sluice's count.
    limit = dialect.metered - 1
    response = api.responses.with_raw_response.create(**responses_options(dialect), stream=True,
                                                      max_output_tokens=limit)
    events = list(response.parse())
    assert sum(event.type.endswith("delta") for event in events) == limit
    final = events[-1]
    assert (final.type, final.response.incomplete_details.reason) == ("response.incomplete", "max_output_tokens")
    assert final.response.usage.output_tokens == limit
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.completion_tokens, row.usage_reported) == ("completed", limit, False)


async def test_the_async_sdk_through_each_responses_dialect(replaying_gateway, make_user):
    caller = await sync_to_async(make_user)()
    async with openai.AsyncOpenAI(base_url=replaying_gateway.api_url, api_key=caller.key, max_retries=0,
                                  timeout=30) as api:
        for dialect in RESPONSES_DIALECTS:
            async with api.responses.stream(**responses_options(dialect)) as stream:
                if dialect.usage is None:
                    with pytest.raises(openai.APIError) as cut:
                        await stream.until_done()
                    assert cut.value.code == "upstream_error"
                else:
                    check_response(dialect, await stream.get_final_response())
            await sync_to_async(check_responses_ledger)(dialect, await sync_to_async(newest_request)(caller.user))
            if dialect.has_json:  # and not streamed: the server's JSON answer
                response = await api.responses.with_raw_response.create(**responses_options(dialect))
                check_response(dialect, response.parse())
                row = await sync_to_async(settled_row)(response.headers["x-request-id"])
                assert (row.status, row.stream, row.usage_reported) == ("completed", False, True)
                assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens,
                        row.reasoning_tokens) == dialect.usage
