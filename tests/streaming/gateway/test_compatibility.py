"""Issue 16, items 1-4: whatever a client sends reaches the provider, through real gateways and the official SDK.

1. Fields Sluice does not read pass untouched (the provider's own request body is captured: tests/support/dialects.py
   keeps every body it receives); an operator may deny or strip named fields per model (SLUICE_FIELD_RULES), on
   every endpoint (chat, Responses, completions, embeddings).
2. `n > 1`: n choices, reserved n times at admission, each held to max_tokens, usage summed.
3. The token limit goes in the field the provider takes (UPSTREAM_TOKEN_LIMIT_FIELD).
4. The client's `stream_options` are merged with Sluice's own.
"""

import json

import httpx2
import openai
import pytest
from django.test import override_settings

from streaming.errors import ApiError
from streaming.gateway.bodies import parse_embeddings_request, parse_responses_request, parse_text_completion_request
from streaming.gateway.validation import field_rules, field_rules_problem
from streaming.provider.client import token_limit_field
from tests.support.gateways import gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hi"}]
FIELD_RULES = {"echo": {"deny": ["logit_bias"], "strip": ["user"]}, "*": {"strip": ["x_stripped_everywhere"]}}
# Every field issue 16 found refused, with the values a client of each would send: the SDK's own typed parameters...
SDK_FIELDS = {
    "prediction": {"type": "content", "content": "Hello there"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prompt_cache_key": "tenant-42:chat",
    "prompt_cache_retention": "24h",
    "verbosity": "low",
    "safety_identifier": "a1b2c3",
    "web_search_options": {"search_context_size": "low", "user_location": {"type": "approximate",
                                                                          "approximate": {"country": "FR"}}},
    "functions": [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "function_call": {"name": "get_weather"},
    # ... and fields Sluice always forwarded, no longer type-checked: the provider judges them.
    "temperature": 0.25, "top_p": 0.9, "seed": 7, "stop": ["\n\n"], "logprobs": True, "top_logprobs": 2,
    "metadata": {"team": "search"}, "reasoning_effort": "minimal", "service_tier": "flex", "store": False,
}
# ... and the extra_body fields of vLLM, Ollama and other servers, and one no server knows yet.
EXTRA_BODY = {
    "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": False,
    "chat_template_kwargs": {"enable_thinking": False},
    "guided_json": {"type": "object", "properties": {"answer": {"type": "string"}}},
    "structured_outputs": {"json": {"type": "object"}},
    "reasoning": {"effort": "low", "exclude": True},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "x_vendor_flag": {"nested": [1, 2.5, None, "é", {"deep": [True]}]},
}


@pytest.fixture(scope="module")
def provider_gateway(dialects, django_db_setup, django_db_blocker):
    """A gateway in front of the dialect provider (the model name picks the dialect), with field rules; its provider's
    URL is not OpenAI's, so a limit the client did not set goes in `max_tokens`."""
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS="echo,other,ignores-max-tokens,max-tokens-only,rejects-max-tokens",
                        SLUICE_FIELD_RULES=json.dumps(FIELD_RULES)) as running:
        yield running


@pytest.fixture(scope="module")
def completion_tokens_gateway(dialects, django_db_setup, django_db_blocker):
    """The same provider, configured as OpenAI's reasoning models need: the limit in `max_completion_tokens`."""
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS="rejects-max-tokens", UPSTREAM_TOKEN_LIMIT_FIELD="max_completion_tokens") as running:
        yield running


def client(gateway, key):
    return openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0, timeout=30)


def received(dialects, response) -> dict:
    """The body the provider received for the gateway's request behind `response` (a raw SDK response)."""
    answer = httpx2.get(f"{dialects.base_url}/received/{response.headers['x-request-id']}", timeout=10)
    assert answer.status_code == 200, "the provider received no request for it"
    return answer.json()


# 1. Pass-through. -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_every_field_sluice_does_not_read_reaches_the_provider_untouched(provider_gateway, dialects, make_user, stream):
    caller = make_user()
    response = client(provider_gateway, caller.key).chat.completions.with_raw_response.create(
        model="other", messages=MESSAGES, max_tokens=5, stream=stream, **SDK_FIELDS, extra_body=EXTRA_BODY)
    parsed = response.parse()
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == " tok" * 5
    else:
        assert parsed.choices[0].message.content == " tok" * 5
    body = received(dialects, response)
    for name, value in {**SDK_FIELDS, **EXTRA_BODY}.items():
        assert name in body and body[name] == value, name
        assert type(body[name]) is type(value), name  # 0.25 stays a float, 7 an integer
    assert (body["model"], body["messages"], body["max_tokens"]) == ("other", MESSAGES, 5)
    assert "max_completion_tokens" not in body and "n" not in body
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.completion_tokens) == ("completed", 5)


def test_a_field_the_provider_refuses_comes_back_as_its_own_400(provider_gateway, make_user):
    # The provider judges what Sluice forwards: here the client's own max_completion_tokens, which this server
    # does not know (item 3: the client's choice is kept).
    with pytest.raises(openai.BadRequestError) as refused:
        client(provider_gateway, make_user().key).chat.completions.create(model="max-tokens-only", messages=MESSAGES,
                                                                 max_completion_tokens=5)
    assert refused.value.code == "upstream_rejected"
    assert "max_completion_tokens" in refused.value.message


def test_an_operator_denies_a_field_for_a_model_by_name(provider_gateway, dialects, make_user):
    caller = make_user()
    with pytest.raises(openai.BadRequestError) as refused:
        client(provider_gateway, caller.key).chat.completions.create(model="echo", messages=MESSAGES, logit_bias={"50256": -100})
    error = refused.value
    assert (error.code, error.param) == ("unsupported_parameter", "logit_bias")
    assert error.body["message"] == "Unsupported parameter: 'logit_bias' is not supported with this model."
    # The rule is the model's: another model forwards it.
    response = client(provider_gateway, caller.key).chat.completions.with_raw_response.create(
        model="other", messages=MESSAGES, max_tokens=2, logit_bias={"50256": -100})
    assert received(dialects, response)["logit_bias"] == {"50256": -100}


def test_an_operator_strips_a_field_before_forwarding(provider_gateway, dialects, make_user):
    api = client(provider_gateway, make_user().key).chat.completions
    response = api.with_raw_response.create(model="echo", messages=MESSAGES, max_tokens=2, user="alice",
                                            temperature=0.5, extra_body={"x_stripped_everywhere": 1})
    body = received(dialects, response)
    assert "user" not in body and "x_stripped_everywhere" not in body and body["temperature"] == 0.5
    # "*" applies to every model; "echo"'s rules only to echo.
    response = api.with_raw_response.create(model="other", messages=MESSAGES, max_tokens=2, user="alice",
                                            extra_body={"x_stripped_everywhere": 1})
    body = received(dialects, response)
    assert body["user"] == "alice" and "x_stripped_everywhere" not in body


def test_field_rules_are_a_pure_function_of_the_body_and_the_rules():
    rules = {"gpt-5*": {"deny": ["logit_bias"], "strip": ["temperature"]}, "*": {"strip": ["user"]}}
    body = {"model": "gpt-5-mini", "messages": [], "temperature": 1, "user": "u", "top_k": 3}
    assert field_rules(body, rules) == {"model": "gpt-5-mini", "messages": [], "top_k": 3}
    assert field_rules({**body, "model": "llama"}, rules) == {"model": "llama", "messages": [], "temperature": 1,
                                                                "top_k": 3}
    assert field_rules(body, {}) is body
    with pytest.raises(ApiError) as denied:
        field_rules({**body, "logit_bias": {}}, rules)
    assert (denied.value.status, denied.value.code, denied.value.param) == (400, "unsupported_parameter", "logit_bias")
    assert field_rules_problem(rules) is None
    assert field_rules_problem([]) and field_rules_problem({"*": {"deny": "x"}})
    assert field_rules_problem({"*": {"allow": []}}) and field_rules_problem({"*": {"strip": ["messages"]}})


# The other endpoints' bodies, each as its SDK call sends it (`extra_body` for what the call does not type): the
# operator's rules are the model's, whichever endpoint the request comes through. (The dialect provider answers them
# all in chat's format: what it received is what is checked, so the answers are left unparsed.)
ENDPOINT_CALLS = {
    "responses": lambda api, **fields: api.responses.with_raw_response.create(
        input="hi", max_output_tokens=16, **_typed(fields, "user", "temperature")),
    "completions": lambda api, **fields: api.completions.with_raw_response.create(
        prompt="hi", max_tokens=2, **_typed(fields, "user", "temperature", "logit_bias")),
    "embeddings": lambda api, **fields: api.embeddings.with_raw_response.create(
        input="hi", encoding_format="float", **_typed(fields, "user")),
}


def _typed(fields, *typed):
    """The fields as an SDK call takes them: its own parameters by name, the others in `extra_body`."""
    extra = {name: value for name, value in fields.items() if name not in typed and name != "model"}
    return {"model": fields["model"], **{name: fields[name] for name in typed if name in fields},
            **({"extra_body": extra} if extra else {})}


@pytest.mark.parametrize("endpoint", list(ENDPOINT_CALLS))
def test_an_operators_field_rules_apply_to_every_endpoint(provider_gateway, dialects, make_user, endpoint):
    call, api = ENDPOINT_CALLS[endpoint], client(provider_gateway, make_user().key)
    with pytest.raises(openai.BadRequestError) as refused:
        call(api, model="echo", logit_bias={"50256": -100})
    error = refused.value
    assert (error.status_code, error.code, error.param) == (400, "unsupported_parameter", "logit_bias")
    assert error.body["message"] == "Unsupported parameter: 'logit_bias' is not supported with this model."
    # Refused before any provider call.
    unseen = httpx2.get(f"{dialects.base_url}/received/{error.response.headers['x-request-id']}", timeout=10)
    assert unseen.status_code == 404
    response = call(api, model="echo", user="alice", temperature=0.5, x_stripped_everywhere=1, x_kept={"a": [1]})
    assert response.status_code == 200
    body = received(dialects, response)
    assert "user" not in body and "x_stripped_everywhere" not in body
    assert (body["model"], body["x_kept"]) == ("echo", {"a": [1]})
    assert body["temperature"] == 0.5
    # "echo"'s rules are echo's alone; "*" strips for every model.
    response = call(api, model="other", user="alice", logit_bias={"50256": -100}, x_stripped_everywhere=1)
    body = received(dialects, response)
    assert (body["user"], body["logit_bias"]) == ("alice", {"50256": -100}) and "x_stripped_everywhere" not in body


def test_the_other_endpoints_bodies_get_the_field_rules_before_anything_reads_them():
    rules = {"m": {"deny": ["logit_bias"], "strip": ["user", "max_output_tokens", "max_tokens", "stream"]}}
    responses = parse_responses_request({"model": "m", "input": "hi", "user": "u", "max_output_tokens": 5,
                                         "stream": True, "top_k": 3}, rules)
    assert (responses.max_tokens, responses.stream, responses.options) == (None, False, {"input": "hi", "top_k": 3})
    completion = parse_text_completion_request({"model": "m", "prompt": "hi", "user": "u", "max_tokens": 5,
                                                "top_k": 3}, rules)
    # Its limit stripped, a completion gets OpenAI's default for this endpoint.
    assert (completion.max_tokens, completion.options) == (16, {"top_k": 3})
    embeddings = parse_embeddings_request({"model": "m", "input": "hi", "user": "u", "dimensions": 8}, rules)
    assert embeddings.body == {"model": "m", "input": "hi", "dimensions": 8}
    for parse, body in ((parse_responses_request, {"input": "hi"}), (parse_text_completion_request, {"prompt": "hi"}),
                        (parse_embeddings_request, {"input": "hi"})):
        with pytest.raises(ApiError) as denied:
            parse({"model": "m", **body, "logit_bias": {}}, rules)
        assert (denied.value.status, denied.value.code, denied.value.param) == (400, "unsupported_parameter",
                                                                                "logit_bias")
        assert parse({"model": "other", **body, "logit_bias": {}}, rules)  # another model's request passes


# 2. n > 1. --------------------------------------------------------------------------------------------------------


def choices_of(chunks):
    """{index: (text, finish_reason)} from streamed chunks."""
    texts, finishes = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return {index: (texts[index], finishes.get(index)) for index in texts}


def test_n_choices_stream_interleaved_with_their_usage_summed(sim, make_user):
    caller = make_user()
    response = client(sim, caller.key).chat.completions.with_raw_response.create(
        model="sim-small", messages=MESSAGES, n=3, max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(response.parse())
    assert choices_of(chunks) == {0: (" the quick brown fox", "length"), 1: (" quick brown fox jumps", "length"),
                                  2: (" brown fox jumps over", "length")}
    assert chunks[-1].usage.completion_tokens == 12
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.completion_tokens, row.usage_reported) == ("completed", 12, True)


def test_the_sdks_stream_helper_assembles_n_choices(sim, make_user):
    api = client(sim, make_user().key).chat.completions
    # The helper refuses an answer cut by its length: the simulator's whole answer is 48 words.
    with api.stream(model="sim-small", messages=MESSAGES, n=2) as stream:
        completion = stream.get_final_completion()
    answers = [(c.index, c.message.content.split()[:3], len(c.message.content.split()), c.finish_reason)
               for c in completion.choices]
    assert answers == [(0, ["the", "quick", "brown"], 48, "stop"), (1, ["quick", "brown", "fox"], 48, "stop")]


async def test_n_choices_without_streaming_async(sim, make_user):
    from asgiref.sync import sync_to_async

    caller = await sync_to_async(make_user)()
    async with openai.AsyncOpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0) as api:
        completion = await api.chat.completions.create(model="sim-large", messages=MESSAGES, n=2, max_tokens=3)
    assert [c.message.content for c in completion.choices] == [" the quick brown", " quick brown fox"]
    assert completion.usage.completion_tokens == 6


def test_n_times_the_budget_is_reserved_at_admission(sim, make_user):
    # 8 prompt tokens and 2 x 40 asked of a 50-token day: the reservation is 50, so each choice gets 21.
    caller = make_user(tokens_per_day=50)
    response = client(sim, caller.key).chat.completions.with_raw_response.create(
        model="sim-small", messages=MESSAGES, n=2, max_tokens=40)
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    completion = response.parse()
    assert [c.finish_reason for c in completion.choices] == ["length", "length"]
    assert completion.usage.completion_tokens == 42
    row = settled_row(response.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens, row.charged_tokens) == (8, 42, 50)
    # A day with room for the prompt and one choice, but not one token for each of 8: refused, nothing charged.
    with pytest.raises(openai.RateLimitError) as refused:
        client(sim, make_user(tokens_per_day=12).key).chat.completions.create(model="sim-small", messages=MESSAGES,
                                                                               n=8)
    assert refused.value.code == "insufficient_quota"


def test_each_choice_is_cut_at_max_tokens_on_its_own(provider_gateway, make_user):
    # The provider streams three times the max_tokens it was sent, for each of two choices.
    caller = make_user()
    response = client(provider_gateway, caller.key).chat.completions.with_raw_response.create(
        model="ignores-max-tokens", messages=MESSAGES, n=2, max_tokens=5, stream=True)
    assert choices_of(list(response.parse())) == {0: (" tok" * 5, "length"), 1: (" tok" * 5, "length")}
    row = settled_row(response.headers["x-request-id"])
    assert (row.status, row.completion_tokens, row.usage_reported) == ("completed", 10, False)


# 3. The token-limit field. ----------------------------------------------------------------------------------------


def test_a_limit_the_client_did_not_set_goes_in_max_tokens_for_a_server_that_knows_only_that(provider_gateway, dialects,
                                                                                            make_user):
    caller = make_user(max_tokens_per_request=6)
    response = client(provider_gateway, caller.key).chat.completions.with_raw_response.create(
        model="max-tokens-only", messages=MESSAGES, stream=True)
    assert choices_of(list(response.parse())) == {0: (" tok" * 6, "stop")}
    body = received(dialects, response)
    assert body["max_tokens"] == 6 and "max_completion_tokens" not in body


def test_a_limit_the_client_did_not_set_goes_in_max_completion_tokens_where_configured(completion_tokens_gateway,
                                                                                    dialects, make_user):
    # OpenAI's reasoning models refuse max_tokens: before, Sluice injected it and every such request failed.
    caller = make_user(max_tokens_per_request=6)
    api = client(completion_tokens_gateway, caller.key).chat.completions
    for stream in (False, True):
        response = api.with_raw_response.create(model="rejects-max-tokens", messages=MESSAGES, stream=stream)
        answer = list(response.parse()) if stream else response.parse().choices
        assert answer
        body = received(dialects, response)
        assert body["max_completion_tokens"] == 6 and "max_tokens" not in body
    # The client's own choice is kept, clamped: the provider judges it.
    response = api.with_raw_response.create(model="rejects-max-tokens", messages=MESSAGES, max_completion_tokens=50)
    assert received(dialects, response)["max_completion_tokens"] == 6
    with pytest.raises(openai.BadRequestError) as refused:
        api.create(model="rejects-max-tokens", messages=MESSAGES, max_tokens=3)
    assert (refused.value.code, refused.value.param) == ("upstream_rejected", "max_tokens")


@pytest.mark.parametrize("setting, url, field", [
    ("auto", "https://api.openai.com/v1", "max_completion_tokens"),  # OPENAI_API_KEY alone: client.provider_url
    ("auto", "http://127.0.0.1:8001/v1", "max_tokens"),
    ("auto", "https://openrouter.ai/api/v1", "max_tokens"),
    ("max_tokens", "https://api.openai.com/v1", "max_tokens"),
    ("max_completion_tokens", "http://127.0.0.1:11434/v1", "max_completion_tokens"),
])
def test_the_token_limit_field_for_each_provider(setting, url, field):
    with override_settings(UPSTREAM_TOKEN_LIMIT_FIELD=setting):
        assert token_limit_field(url) == field


# 4. stream_options. -----------------------------------------------------------------------------------------------


def test_the_clients_stream_options_are_merged_with_sluices_own(provider_gateway, dialects, make_user):
    caller = make_user()
    response = client(provider_gateway, caller.key).chat.completions.with_raw_response.create(
        model="other", messages=MESSAGES, max_tokens=3, stream=True,
        stream_options={"include_usage": False, "include_obfuscation": False})
    chunks = list(response.parse())
    # Sluice asked for usage for itself, and did not pass it on: the client did not ask.
    assert all(chunk.usage is None for chunk in chunks)
    assert received(dialects, response)["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    row = settled_row(response.headers["x-request-id"])
    assert (row.completion_tokens, row.usage_reported) == (3, True)
