"""Every bad input gets a clear 4xx in OpenAI's error shape: never a 500, never HTML under /v1/."""

import json

import httpx2
import openai
import pytest

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def post(sim, make_user):
    caller = make_user()

    def post(body=None, *, raw=None, headers=None, method="POST", path="/v1/chat/completions"):
        send_headers = {"Authorization": f"Bearer {caller.key}", "Content-Type": "application/json", **(headers or {})}
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return httpx2.request(method, sim.base_url + path, content=content, headers=send_headers, timeout=10)

    return post


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param, code", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
    ({"model": "sim-small"}, "messages", "missing_required_parameter"),
    ({**GOOD, "messages": []}, "messages", "empty_array"),
    ({**GOOD, "messages": "hello"}, "messages", "invalid_type"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({**GOOD, "messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
    ({**GOOD, "model": 3}, "model", "invalid_type"),
    ({**GOOD, "stream": "yes"}, "stream", "invalid_type"),
    ({**GOOD, "max_tokens": "ten"}, "max_tokens", "invalid_type"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**GOOD, "n": 0}, "n", "invalid_value"),
    ({**GOOD, "n": 129}, "n", "invalid_value"),
    ({**GOOD, "n": "2"}, "n", "invalid_type"),
    ({**GOOD, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
])
def test_invalid_fields(post, body, param, code):
    error = error_of(post(body), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_invalid_json(post):
    assert error_of(post(raw=b'{"model": "sim-small", '), 400)["code"] == "invalid_json"
    assert error_of(post(raw=b'[1, 2]'), 400)["code"] == "invalid_json"


def test_wrong_content_type(post):
    error = error_of(post(GOOD, headers={"Content-Type": "text/plain"}), 415)
    assert "application/json" in error["message"]


def test_body_over_the_size_limit(post):
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert error_of(post(huge), 413)["code"] == "request_too_large"


def test_unknown_model(post):
    error = error_of(post({**GOOD, "model": "gpt-17"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_wrong_method(post):
    response = post(method="GET")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    assert error_of(post(GOOD, method="POST", path="/v1/models"), 405)["code"] == "method_not_allowed"


def test_unknown_path_under_v1(post):
    assert error_of(post(method="GET", path="/v1/engines/davinci"), 404)["code"] == "unknown_url"
    assert error_of(post(GOOD, path="/v1/audio/speech"), 404)["code"] == "unknown_url"
    # The Responses API's stored state is the provider's (docs/api.md): not served here.
    assert error_of(post(method="GET", path="/v1/responses/resp_123"), 404)["code"] == "unknown_url"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer sk-sluice-not-a-key", "Basic dXNlcjpwYXNz"])
def test_missing_or_unknown_key_is_401(sim, header):
    headers = {"Content-Type": "application/json", **({"Authorization": header} if header else {})}
    response = httpx2.post(sim.api_url + "/chat/completions", json=GOOD, headers=headers)
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_revoked_and_expired_keys_are_401(sim, make_user):
    from datetime import timedelta

    from django.utils import timezone

    from quotas.models import ApiKey

    caller = make_user()
    key = ApiKey.objects.get(user=caller.user)
    client = openai.OpenAI(base_url=sim.api_url, api_key=caller.key, max_retries=0)
    assert client.models.list().data
    key.revoked_at = timezone.now()
    key.save()
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    _, raw = ApiKey.issue(caller.user, expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sim.api_url, api_key=raw, max_retries=0).models.list()


def test_keys_are_stored_hashed(make_user):
    from quotas.models import ApiKey

    caller = make_user()
    key = ApiKey.objects.get(user=caller.user)
    assert caller.key not in (key.hashed_key, key.prefix) and key.matches(caller.key)
    assert not key.matches(caller.key + "x")


def test_upstream_errors_never_leak_its_address(sim, make_user):
    caller = make_user()
    sim.control(fail_500_rate=1.0)
    response = httpx2.post(sim.api_url + "/chat/completions", json=GOOD,
                           headers={"Authorization": f"Bearer {caller.key}"}, timeout=30)
    assert response.status_code >= 500
    error = error_of(response, response.status_code)
    assert "127.0.0.1" not in response.text and "_sim" not in response.text and "Traceback" not in response.text
    assert error["code"].startswith("upstream")
