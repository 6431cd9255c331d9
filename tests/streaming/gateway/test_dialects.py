"""Issue 16, item 7: the official SDK, sync and async, through each recorded dialect (tests/support/dialects/, replayed
by the dialect provider as model `replay-<name>`), and what each ending records in the ledger.

The client gets every chunk as the server wrote it (Ollama's tool-call indexes, OpenRouter's reasoning details), the
usage chunk only when it asked (or when the server puts usage in a chunk that also carries a choice, as OpenRouter
does), and Sluice's own usage chunk when it asked and the server sent none. The ledger records the server's usage when
it sent one (`usage_reported`), otherwise Sluice's count: the prompt as estimated (10 tokens for PROMPT) and the
completion as metered.
"""

from dataclasses import dataclass, field

import openai
import pytest
from asgiref.sync import sync_to_async

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


@pytest.fixture(scope="module")
def replaying_gateway(dialects, django_db_setup, django_db_blocker):
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS=",".join(f"replay-{d.name}" for d in DIALECTS)) as running:
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
