"""Hostile input (issue 15): no 5xx from any body, header or request line, and nothing but OpenAI's error JSON under
/v1/ and the demo's /api/, against a real gateway process.

Each bad body is sent both to /v1/chat/completions (API key) and to the demo's /api/chat (session and CSRF token):
they share validation.parse_body and the error handling.
"""

import json
import socket

import httpx2
import pytest

from tests.support.gateways import open_stream, sign_in

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SURFACES = ["api", "demo"]


def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


class Caller:
    """Posts raw bodies to /v1/chat/completions with the API key, or to /api/chat with the session."""

    def __init__(self, gateway, account, surface):
        self.gateway, self.account, self.surface = gateway, account, surface
        self.http = httpx2.Client(base_url=gateway.base_url, timeout=30)
        if surface == "api":
            self.path, self.headers = "/v1/chat/completions", {"Authorization": f"Bearer {account.key}"}
        else:
            self.path, self.headers = "/api/chat", {"X-CSRFToken": sign_in(self.http, account.user.username)}

    def post(self, content, content_type="application/json", **headers):
        return self.http.post(self.path, content=content,
                              headers={**self.headers, "Content-Type": content_type, **headers})

    def post_json(self, body):
        return self.post(json.dumps(body).encode())


@pytest.fixture(params=SURFACES)
def caller(request, sim, make_user):
    client = Caller(sim, make_user(), request.param)
    yield client
    client.http.close()


def upstream_attempts(gateway):
    return gateway.stats()["attempts"]


def rows_of(account):
    from quotas.models import Usage

    return list(Usage.objects.filter(user=account.user).values_list("status", "reason"))


# 1. A role that is not a string; JSON nested too deeply. ------------------------------------------------------


@pytest.mark.parametrize("role", [["user"], {"name": "user"}, 5, True])
def test_a_role_that_is_not_a_string_is_a_400(caller, role):
    error = error_of(caller.post_json({**GOOD, "messages": [{"role": role, "content": "x"}]}), 400)
    assert (error["param"], error["code"]) == ("messages[0].role", "invalid_type")


@pytest.mark.parametrize("nested", [
    b"[" * 10_000 + b"]" * 10_000,  # the whole body
    b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "metadata": {"a": '
    + b"[" * 10_000 + b"]" * 10_000 + b"}}",
    b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "metadata": {"a": '
    + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}}",  # parses, but deeper than any real request
])
def test_json_nested_too_deeply_is_a_400(caller, nested):
    error = error_of(caller.post(nested), 400)
    assert error["code"] == "invalid_json" and "nested" in error["message"]


# 2. Numbers JSON cannot carry and strings UTF-8 cannot: refused before any provider call. -----------------------


@pytest.mark.parametrize("literal, named", [
    (b"NaN", "NaN"), (b"Infinity", "Infinity"), (b"-Infinity", "-Infinity"), (b"1e309", "1e309"),
    (b"-1e309", "-1e309"),
])
@pytest.mark.parametrize("where", ["temperature", "nested"])
def test_non_finite_numbers_are_refused_before_the_provider(caller, literal, named, where):
    if where == "temperature":
        body = b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % literal
    else:
        body = (b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}], '
                b'"tools": [{"type": "function", "function": {"name": "f", "parameters": {"max": %s}}}]}' % literal)
    before = upstream_attempts(caller.gateway)
    error = error_of(caller.post(body), 400)
    assert error["code"] in ("invalid_json", "invalid_value") and named in error["message"]
    assert upstream_attempts(caller.gateway) == before
    assert rows_of(caller.account) == []  # no upstream_error, no row at all: it never reached admission


@pytest.mark.parametrize("body, param", [
    (b'{"model": "sim-small", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "sim-small", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (b'{"model": "sim-small", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ude00\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "metadata": {"\\ud800": "k"}}',
     "metadata"),
    (b'{"model": "sim-\\udc00", "messages": [{"role": "user", "content": "x"}]}', "model"),
])
def test_lone_surrogates_are_refused_before_the_provider(caller, body, param):
    before = upstream_attempts(caller.gateway)
    error = error_of(caller.post(body), 400)
    assert (error["code"], error["param"]) == ("invalid_value", param) and "surrogate" in error["message"]
    assert upstream_attempts(caller.gateway) == before
    assert rows_of(caller.account) == []


def test_a_surrogate_pair_is_a_character_and_passes(caller):
    response = caller.post(b'{"model": "sim-small", "max_tokens": 2, '
                           b'"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}')
    assert response.status_code == 200, response.text


# 3. Content parts. -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, param, code", [
    (["hello"], "messages[0].content[0]", "invalid_type"),
    ([{"type": "text", "text": "a"}, 7], "messages[0].content[1]", "invalid_type"),
    ([{"type": "text", "text": 5}], "messages[0].content[0].text", "invalid_type"),
    ([{"type": "text", "text": {"value": "a"}}], "messages[0].content[0].text", "invalid_type"),
    ([{"type": "text"}], "messages[0].content[0].text", "missing_required_parameter"),
    ([{"text": "hello"}], "messages[0].content[0].type", "missing_required_parameter"),
    ([{"type": ["text"], "text": "a"}], "messages[0].content[0].type", "invalid_type"),
])
def test_content_parts_are_validated(caller, content, param, code):
    before = upstream_attempts(caller.gateway)
    error = error_of(caller.post_json({**GOOD, "messages": [{"role": "user", "content": content}]}), 400)
    assert (error["param"], error["code"]) == (param, code)
    assert upstream_attempts(caller.gateway) == before


def test_parts_of_other_types_pass_through_for_the_provider_to_judge(caller):
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]
    response = caller.post_json({**GOOD, "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text


# 4. Bodies Django refuses before the view, and request lines outside the routes. --------------------------------


def test_a_chunked_body_over_djangos_limit_is_a_413(caller):
    from django.conf import settings

    def chunks():  # no Content-Length: the size is only known once it has been read
        piece = b" " * 65536
        yield b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}]}'
        for _ in range(settings.DATA_UPLOAD_MAX_MEMORY_SIZE // len(piece) + 2):
            yield piece

    response = caller.http.post(caller.path, content=chunks(), headers={**caller.headers,
                                                                        "Content-Type": "application/json"})
    assert error_of(response, 413)["code"] == "request_too_large"


def test_a_malformed_multipart_body_is_json(caller):
    # No boundary: neither Twisted nor Django can parse it.
    response = caller.post(b"--x\r\nnot a part\r\n", content_type="multipart/form-data")
    # The API's view refuses the type; the demo's CSRF check reads the form first, and Django cannot parse it.
    error = error_of(response, 415 if caller.surface == "api" else 400)
    assert error["code"] == ("unsupported_media_type" if caller.surface == "api" else "bad_request")


def test_an_unknown_path_under_api_is_a_json_404(sim):
    response = httpx2.get(sim.base_url + "/api/nothing-here")
    assert error_of(response, 404)["code"] == "unknown_url"


def raw_request(gateway, head: bytes, body=b""):
    """One request on a raw socket (the request line as given); (status, headers, body) once the server closes."""
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10) as sock:
        sock.sendall(head + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return lines[0], headers, body


def dechunk(body):
    content = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        size = int(size, 16)
        if not size:
            return content
        content, body = content + body[:size], body[size + 2:]


def test_an_absolute_form_request_target_reaches_the_api(sim, make_user):
    caller = make_user()
    authority = f"127.0.0.1:{sim.server.port}".encode()
    status, headers, body = raw_request(sim, b"GET http://%s/v1/models HTTP/1.1\r\nHost: %s\r\n"
                                             b"Authorization: Bearer %s\r\n" % (authority, authority,
                                                                                caller.key.encode()))
    assert status.startswith("HTTP/1.1 200") and headers["content-type"] == "application/json"
    assert [m["id"] for m in json.loads(body)["data"]] == ["sim-small", "sim-large"]
    status, headers, body = raw_request(sim, b"GET http://%s/v1/nothing HTTP/1.1\r\nHost: %s\r\n"
                                             b"Authorization: Bearer %s\r\n" % (authority, authority,
                                                                                caller.key.encode()))
    assert status.startswith("HTTP/1.1 404") and json.loads(body)["error"]["code"] == "unknown_url"


def test_the_500_handler_answers_json_under_api_too(rf):
    from streaming.gateway.views import server_error

    for path in ("/v1/chat/completions", "/api/chat"):
        response = server_error(rf.post(path))
        assert response.status_code == 500 and response["Content-Type"] == "application/json"
        assert json.loads(response.content)["error"]["code"] == "internal_error"


# 5. Refusals carry x-request-id, and the x-ratelimit-* headers once the caller is known. -------------------------


RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def assert_identified(response, rate_headers=RATE_HEADERS):
    assert response.headers["x-request-id"].startswith("req_"), response.headers
    missing = [name for name in rate_headers if name not in response.headers]
    assert not missing, (missing, response.headers)


def completion(gateway, key, **body):
    return httpx2.post(gateway.api_url + "/chat/completions", json={**GOOD, **body},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_bad_key_refusal_has_a_request_id(sim):
    response = completion(sim, "sk-sluice-not-a-key")
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert_identified(response, rate_headers=())


def test_a_suspended_refusal_has_the_request_id_and_rate_headers(sim, make_user):
    from quotas.models import UserQuota

    account = make_user(requests_per_minute=5)
    UserQuota.objects.filter(user=account.user).update(suspended=True)
    response = completion(sim, account.key)
    assert error_of(response, 403)["code"] == "account_suspended"
    assert_identified(response)
    assert response.headers["x-ratelimit-limit-requests"] == "5"


def test_a_rate_refusal_has_its_ledger_rows_request_id_and_rate_headers(sim, make_user):
    from quotas.models import Usage

    account = make_user(requests_per_minute=1)
    assert completion(sim, account.key).status_code == 200
    response = completion(sim, account.key)
    assert error_of(response, 429)["code"] == "rate_limit_exceeded"
    assert_identified(response)
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    row = Usage.objects.get(request_id=response.headers["x-request-id"])
    assert (row.status, row.reason) == ("rejected", "rate_limit_exceeded")


def test_completion_refusals_have_the_request_id_and_rate_headers(sim, make_user):
    response = completion(sim, make_user().key, model="gpt-17")
    assert error_of(response, 404)["code"] == "model_not_found"
    assert_identified(response)

    response = completion(sim, make_user(tokens_per_day=40).key, messages=[{"role": "user", "content": "x " * 60}])
    assert error_of(response, 429)["code"] == "insufficient_quota"
    assert_identified(response)

    account = make_user(concurrent_streams=1)
    sim.control(stall_midstream_after=1)  # the first stream holds its slot until its reader leaves
    sock, _, _ = open_stream(sim, account.key, max_tokens=5)
    with sock:
        response = completion(sim, account.key)
    assert error_of(response, 429)["code"] == "concurrency_limit_exceeded"
    assert_identified(response)


def test_a_store_down_refusal_has_the_request_id_and_the_limits(make_user):
    from tests.support.gateways import gateway_server

    account = make_user(requests_per_minute=9)
    with gateway_server(REDIS_URL="redis://127.0.0.1:1/0") as gateway:
        response = completion(gateway, account.key)
    assert error_of(response, 503)["code"] == "service_unavailable"
    # The store is what would say what remains: the limits only.
    assert_identified(response, rate_headers=("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens"))
    assert response.headers["x-ratelimit-limit-requests"] == "9"


@pytest.mark.parametrize("model", ["sim-small\x00", "x" * 1000, "\x00"])
def test_a_model_name_no_column_can_hold_is_a_404(caller, model):
    # The refusal's ledger row names the model: PostgreSQL refuses NUL characters, and the column holds 100.
    error = error_of(caller.post_json({**GOOD, "model": model}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
