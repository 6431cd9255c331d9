"""The official openai SDK, sync and async, against a real gateway process on loopback."""

import openai
import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_sync_streaming_without_usage(sim, make_user):
    caller = make_user()
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    stream = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hello"}],
                                           stream=True, max_tokens=7)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " the quick brown fox jumps over a"
    assert chunks[-1].choices[0].finish_reason == "length"
    # Sluice always asks the upstream for usage, and strips it when the client did not ask.
    assert all(not c.usage for c in chunks)


def test_sync_streaming_with_usage(sim, make_user):
    caller = make_user()
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "say five words"}], stream=True, max_tokens=5,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    # The simulator's count, as OpenAI's: 3 to prime the reply, 3 per message, "user" 1, "say five words" 3.
    assert chunks[-1].usage.prompt_tokens == 3 + 3 + 1 + 3


def test_sync_non_streaming(sim, make_user):
    caller = make_user()
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    completion = client.chat.completions.create(model="sim-large", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
    assert completion.choices[0].message.content == " the quick brown"
    assert completion.usage.completion_tokens == 3


async def test_async_streaming_and_not(sim, make_user):
    caller = await make_user_async(make_user)
    client = openai.AsyncOpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    stream = await client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}],
                                                  stream=True, max_tokens=4, stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == " the quick brown fox"
    assert usage.completion_tokens == 4
    completion = await client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=2)
    assert completion.choices[0].message.content == " the quick"
    await client.close()


async def make_user_async(make_user, **limits):
    from asgiref.sync import sync_to_async

    return await sync_to_async(make_user)(**limits)


def test_models_lists_what_the_key_may_use(sim, make_user):
    everything = make_user()
    restricted = make_user(allowed_models=["sim-large"])
    assert [m.id for m in openai.OpenAI(base_url=sim.api_url, api_key=everything.key).models.list()] == [
        "sim-small", "sim-large"]
    client = openai.OpenAI(base_url=sim.api_url, api_key=restricted.key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["sim-large"]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}])
    assert error.value.code == "model_not_found"


def test_usage_is_recorded_in_the_ledger(sim, make_user):
    from tests.support.gateways import settled_row

    caller = make_user()
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    response = client.chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=6)
    list(response.parse())
    request_id = response.headers["x-request-id"]
    row = settled_row(request_id)
    assert (row.status, row.completion_tokens, row.prompt_tokens, row.usage_reported) == ("completed", 6, 8, True)
    assert row.bytes_sent > 0 and row.time_to_first_token_ms is not None


def test_the_api_runs_its_own_middleware_chain_and_the_site_the_full_one(sim, make_user):
    # config/asgi.py: /v1/ gets settings.API_MIDDLEWARE (no sessions, CSRF, clickjacking headers), the rest of the
    # site settings.MIDDLEWARE; building the API's chain leaves the process's settings as they were.
    caller = make_user()
    api = sim.http.get(sim.api_url + "/models", headers={"Authorization": f"Bearer {caller.key}"})
    assert api.status_code == 200 and api.headers["x-request-id"].startswith("req_")
    assert "x-frame-options" not in api.headers and "cookie" not in api.headers.get("vary", "").lower()
    site = sim.http.get(sim.base_url + "/admin/login/")
    assert site.status_code == 200 and site.headers["x-frame-options"] == "DENY"
    assert "csrftoken" in site.cookies
