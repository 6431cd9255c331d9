"""POST /v1/embeddings, POST /v1/completions and GET /v1/models/{id} (issue 16, item 6) through a real gateway process
and its simulated provider, with the official SDK (sync and async), and the ledger row each request settles."""

import math

import openai
import pytest

from streaming.simulator.app import WORDS
from tests.support.gateways import settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def words(count, start=0):
    return "".join(f" {WORDS[(start + i) % len(WORDS)]}" for i in range(count))


def sdk(gateway, caller):
    return openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0, timeout=30)


# Embeddings ------------------------------------------------------------------------------------------------------


def test_an_embedding_is_deterministic_and_its_input_is_charged(sim, make_user):
    caller = make_user()
    client = sdk(sim, caller)
    # The SDK asks for base64 unless told otherwise, and decodes it.
    raw = client.embeddings.with_raw_response.create(model="sim-small", input="The food was delicious")
    first = raw.parse()
    vector = first.data[0].embedding
    assert len(vector) == 64 and math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert client.embeddings.create(model="sim-small", input="The food was delicious").data[0].embedding == vector
    assert client.embeddings.create(model="sim-small", input="Something else").data[0].embedding != vector
    assert first.usage.prompt_tokens == 4
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.stream, row.usage_reported) == ("completed", False, True)
    assert (row.prompt_tokens, row.completion_tokens, row.charged_tokens) == (4, 0, 4)


def test_a_batch_of_embeddings_as_strings_or_token_ids(sim, make_user):
    caller = make_user()
    client = sdk(sim, caller)
    batch = client.embeddings.create(model="sim-large", input=["one", "two words", "three more words"],
                                     dimensions=8, encoding_format="float")
    assert [item.index for item in batch.data] == [0, 1, 2]
    assert all(len(item.embedding) == 8 for item in batch.data)
    assert batch.usage.prompt_tokens == 1 + 2 + 3
    tokens = client.embeddings.create(model="sim-large", input=[[1, 2, 3], [4, 5]], dimensions=8)
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 5
    # A shorter vector is the longer one's beginning, renormalised (as text-embedding-3's `dimensions`).
    short, long = (client.embeddings.create(model="sim-large", input="one", dimensions=d).data[0].embedding
                   for d in (4, 8))
    scale = math.sqrt(math.fsum(v * v for v in long[:4]))
    assert all(math.isclose(s, v / scale, rel_tol=1e-5) for s, v in zip(short, long[:4]))


def test_embeddings_are_refused_when_their_input_exceeds_the_quota(sim, make_user):
    caller = make_user(tokens_per_day=10)
    client = sdk(sim, caller)
    with pytest.raises(openai.RateLimitError) as error:
        client.embeddings.create(model="sim-small", input="one two three four five six seven eight nine ten eleven")
    assert error.value.code == "insufficient_quota"
    row = settled_row(error.value.response.headers["x-request-id"])
    assert (row.status, row.reason, row.charged_tokens) == ("rejected", "insufficient_quota", 0)
    assert client.embeddings.create(model="sim-small", input="fits").usage.prompt_tokens == 1
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model="sim-small", input=["text", 3])
    assert (error.value.code, error.value.param) == ("invalid_type", "input[1]")


async def test_async_embeddings(sim, make_user):
    from asgiref.sync import sync_to_async

    caller = await sync_to_async(make_user)()
    client = openai.AsyncOpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0, timeout=30)
    try:
        result = await client.embeddings.create(model="sim-small", input=["a", "b"], dimensions=16)
        assert [len(item.embedding) for item in result.data] == [16, 16]
    finally:
        await client.close()


# Legacy text completions -----------------------------------------------------------------------------------------


def test_a_completion_without_streaming(sim, make_user):
    caller = make_user()
    raw = sdk(sim, caller).completions.with_raw_response.create(model="sim-small", prompt="Say", max_tokens=5)
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == (words(5), "length")
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.stream, row.usage_reported) == ("completed", False, True)
    assert (row.prompt_tokens, row.completion_tokens) == (completion.usage.prompt_tokens, 5)


def test_a_completion_asks_for_16_tokens_unless_told(sim, make_user):
    caller = make_user()
    completion = sdk(sim, caller).completions.create(model="sim-small", prompt="Say")
    assert completion.choices[0].text == words(16) and completion.usage.completion_tokens == 16


def test_a_streamed_completion_with_its_usage(sim, make_user):
    caller = make_user()
    raw = sdk(sim, caller).completions.with_raw_response.create(
        model="sim-small", prompt="Say", max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == words(6)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    row = settled_row(raw.headers["x-request-id"])
    assert (row.status, row.stream, row.completion_tokens, row.usage_reported) == ("completed", True, 6, True)


def test_a_streamed_completion_strips_the_usage_it_was_not_asked_for(sim, make_user):
    caller = make_user()
    chunks = list(sdk(sim, caller).completions.create(model="sim-small", prompt="Say", max_tokens=3, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"


def test_a_batch_of_prompts_gets_a_completion_each(sim, make_user):
    caller = make_user()
    client = sdk(sim, caller)
    completion = client.completions.create(model="sim-small", prompt=["one", "two"], max_tokens=4)
    assert [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)] == [words(4), words(4, 1)]
    texts = {}
    for chunk in client.completions.create(model="sim-small", prompt=["one", "two"], max_tokens=4, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: words(4), 1: words(4, 1)}


def test_a_completion_is_clamped_to_the_quota_left(sim, make_user):
    caller = make_user(tokens_per_day=30)
    raw = sdk(sim, caller).completions.with_raw_response.create(model="sim-small", prompt="Say", max_tokens=200,
                                                               stream=True)
    text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
    row = settled_row(raw.headers["x-request-id"])
    assert row.status == "completed" and row.prompt_tokens + row.completion_tokens <= 30
    assert text == words(row.completion_tokens)


async def test_async_completions(sim, make_user):
    from asgiref.sync import sync_to_async

    caller = await sync_to_async(make_user)()
    client = openai.AsyncOpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0, timeout=30)
    try:
        stream = await client.completions.create(model="sim-small", prompt="x", max_tokens=3, stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream if chunk.choices]) == words(3)
        completion = await client.completions.create(model="sim-small", prompt="x", max_tokens=2)
        assert completion.choices[0].text == words(2)
    finally:
        await client.close()


def test_a_provider_failure_before_the_first_byte_is_an_openai_error(sim, make_user):
    caller = make_user()
    sim.control(fail_500_rate=1.0)
    client = sdk(sim, caller)
    for call in (lambda: client.embeddings.create(model="sim-small", input="x"),
                 lambda: client.completions.create(model="sim-small", prompt="x", stream=True)):
        with pytest.raises(openai.InternalServerError) as error:
            call()
        assert error.value.status_code == 502 and error.value.code == "upstream_error"
        row = settled_row(error.value.response.headers["x-request-id"])
        assert (row.status, row.charged_tokens) == ("upstream_error", 0)


# GET /v1/models/{id} ---------------------------------------------------------------------------------------------


def test_a_model_is_retrieved_only_if_the_plan_allows_it(sim, make_user):
    caller = make_user(allowed_models=["sim-large"])
    client = sdk(sim, caller)
    model = client.models.retrieve("sim-large")
    assert (model.id, model.object) == ("sim-large", "model")
    for name in ("sim-small", "no-such-model", "org/with-a-slash"):
        with pytest.raises(openai.NotFoundError) as error:
            client.models.retrieve(name)
        assert (error.value.code, error.value.param) == ("model_not_found", "model")
        assert error.value.body["type"] == "invalid_request_error"
