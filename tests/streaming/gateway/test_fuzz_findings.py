"""What the fuzz suite (test_fuzz.py) found, one regression test per finding, against a real gateway process.

Fixed (streaming/gateway/validation.py):
1. `stream_options.include_usage` of any type was taken for its truthiness: `"yes"`, `1` or `1e-401` (which underflows
   to 0.0) were accepted, as true or false, where the document says boolean and OpenAI answers 400.

Pinned (a decision the document cannot state):
2. An integer written with a fraction (`2.0`) is an integer to JSON Schema, so schemathesis sends it as valid data;
   the gateway refuses it as OpenAI does (400 invalid_type), and the fuzz suite allows for it.

Fixed outside validation.py and views.py:
3. config/asgi.py: an absolute-form request target whose host urllib cannot parse got a 500 (now 400 JSON).
4. streaming/server/intake.py: the server's own refusals carried a body even when the request was HEAD.
5. Twisted: a request line or header line over 16 KiB got no answer at all (now 431 JSON).
"""

import json

import pytest

from tests.support.fuzz_bodies import Surface, assert_openai_error, encode
from tests.support.fuzz_http import exchange

pytestmark = pytest.mark.django_db(transaction=True)

STREAMING = {"model": "sim-small", "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=["api", "demo"])
def surface(request, sim, make_user):
    client = Surface(sim, make_user(), request.param)
    yield client
    client.http.close()


def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.text[:500])
    return assert_openai_error(status, response.headers["content-type"], response.content)


def upstream_attempts(gateway):
    return gateway.stats()["attempts"]


# 1. stream_options.include_usage is a boolean. ------------------------------------------------------------------

FOUND = b'{"model": "sim-small", "stream": true, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], ' \
        b'"stream_options": {"include_usage": 0.' + b"0" * 400 + b"1}}"  # as the fuzzer sent it


@pytest.mark.parametrize("body", [
    FOUND,
    *(encode({**STREAMING, "stream_options": {"include_usage": value}}) for value in ["yes", 1, 0, [], {"on": True}]),
])
def test_include_usage_that_is_not_a_boolean_is_a_400_before_the_provider(surface, body):
    before = upstream_attempts(surface.gateway)
    error = error_of(surface.post(body), 400)
    assert (error["param"], error["code"]) == ("stream_options.include_usage", "invalid_type")
    assert upstream_attempts(surface.gateway) == before


@pytest.mark.parametrize("include_usage, usage_chunk", [(True, True), (False, False), (None, False)])
def test_include_usage_true_false_or_null_still_decides_the_usage_chunk(surface, include_usage, usage_chunk):
    response = surface.post(json.dumps({**STREAMING, "stream_options": {"include_usage": include_usage}}).encode())
    assert response.status_code == 200, response.text[:300]
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert any("usage" in chunk and chunk["choices"] == [] for chunk in chunks) is usage_chunk


# 2. An integer written with a fraction is refused, as OpenAI refuses it. -----------------------------------------


# In the fields Sluice reads; others (seed, top_logprobs) pass untouched, for the provider to refuse (issue 16).
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n"])
def test_an_integer_written_with_a_fraction_is_refused_as_openai_does(surface, field):
    body = {**STREAMING, field: 1.0}
    error = error_of(surface.post(json.dumps(body).encode()), 400)
    assert (error["param"], error["code"]) == (field, "invalid_type")


# 3-5. Open findings outside validation.py and views.py. ----------------------------------------------------------


@pytest.mark.parametrize("target", [b"http://[::1/v1/models", b"http://[abc]/v1/models", b"ftp://[::1/v1/models",
                                    b"x://]/v1/models", b"http://%EF%BC%83/v1/models"])
def test_an_absolute_form_target_with_a_host_that_cannot_be_parsed_is_a_4xx(sim, make_user, target):
    key = make_user().key.encode()
    [answer] = exchange(sim.server.port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                                         b"Connection: close\r\n\r\n" % (target, key))
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    assert_openai_error(answer.status, answer.content_type, answer.body)


@pytest.mark.parametrize("headers", [
    b"Content-Length: 88\r\n",  # a body and no key: the server's own 401
    b"Authorization: Bearer sk-sluice-x\r\nContent-Length: 999999999\r\n",  # over the limit: the server's own 413
])
def test_the_servers_refusal_of_a_head_request_has_no_body(sim, headers):
    request = b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"Connection: close\r\n\r\n"
    answers = exchange(sim.server.port, request + encode(STREAMING)[:88], head=True)
    assert answers and 400 <= answers[0].status < 500
    # RFC 9110 9.3.2: no body follows the head of an answer to HEAD (a client would read it as the next answer).
    assert [answer.body for answer in answers] == [b""] * len(answers)


@pytest.mark.parametrize("request_head", [
    b"GET /v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # 414 URI Too Long
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n",  # 431
])
def test_a_line_over_16_kib_gets_an_openai_error(sim, request_head):
    answers = exchange(sim.server.port, request_head + b"Connection: close\r\n\r\n")
    assert answers, "the connection was closed with no answer"
    assert_openai_error(answers[0].status, answers[0].content_type, answers[0].body)

