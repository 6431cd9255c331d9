"""The fuzz suite (issue 15): no input makes the gateway answer 5xx, nor anything but OpenAI's error JSON under /v1/
and the demo's /api/, against a real gateway process (Daphne, the simulated provider) over real sockets.

1. The OpenAPI document (streaming/gateway/openapi.json, served at /openapi.json): valid, and listing every /v1/
   route with its methods, so that it cannot drift from streaming/gateway/urls.py.
2. schemathesis against that document, with a key and without: no 5xx, status codes, content types, headers and
   bodies as documented (the SSE stream event by event), schema-valid bodies accepted and invalid ones refused,
   every /v1/ refusal OpenAI's error object.
3. hypothesis for what a document cannot describe: hostile JSON bodies (NaN, 1e309, lone surrogates, deep nesting,
   wrong types in every field) to /v1/chat/completions and the demo's /api/chat; hostile headers and framing
   (Content-Length and Transfer-Encoding disagreeing with the body, non-ASCII bytes, absolute-form targets, unknown
   methods) on raw sockets.

Reproducible: every test is derandomized (the same examples on every run, CI included) and keeps no example
database; SLUICE_FUZZ_SCALE=N runs N times as many, new at each run. Alone: `pytest tests/streaming/gateway/
test_fuzz.py`. What it found is pinned down in test_fuzz_findings.py.
"""

import json
import os
import re

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from streaming.gateway import urls
from streaming.gateway.views import OPENAPI_DOCUMENT
from tests.support.fuzz_bodies import (
    BODIES,
    JSON_PREFIXES,
    Surface,
    assert_answer,
    assert_openai_error,
    document_verdict,
)
from tests.support.fuzz_http import (
    assert_raw_answers,
    exchange,
    framed_requests,
    header_requests,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# SLUICE_FUZZ_SCALE=N: N times the examples, and new ones at each run rather than the fixed set (a longer hunt).
SCALE = int(os.environ.get("SLUICE_FUZZ_SCALE") or 1)
FUZZ = settings(derandomize=SCALE == 1, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def examples(count):
    return settings(FUZZ, max_examples=count * SCALE)


LIMITS = {"requests_per_minute": 1_000_000, "tokens_per_day": 10**12, "tokens_per_month": 10**13,
          "concurrent_streams": 100}


@pytest.fixture
def account(make_user):
    """A user whose limits the fuzzing does not reach: every request is judged on its input alone."""
    return make_user(**LIMITS)


# 1. The document. ------------------------------------------------------------------------------------------------


def test_the_document_is_served_without_a_key_and_is_valid_openapi(gateway):
    from openapi_spec_validator import validate

    response = httpx2.get(gateway.base_url + "/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert document == json.loads(OPENAPI_DOCUMENT.read_text())
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises on any departure from the OpenAPI 3.1 schema
    loaded = schemathesis.openapi.from_url(gateway.base_url + "/openapi.json")
    assert {result.ok().label for result in loaded.get_all_operations()} >= {
        "POST /v1/chat/completions", "GET /v1/models", "GET /v1/quota", "GET /healthz", "GET /readyz"}


def test_the_document_lists_every_v1_route_with_its_methods():
    document = json.loads(OPENAPI_DOCUMENT.read_text())
    routes = {}
    for pattern in urls.urlpatterns:
        route = getattr(pattern.pattern, "_route", None)  # path() routes; the re_path catch-all is not an operation
        if route is not None and (route.startswith("v1/") or route in ("healthz", "readyz", "openapi.json")):
            # A path converter is a template parameter: v1/models/<path:model> is /v1/models/{model}.
            route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
            routes["/" + route] = {method.lower() for method in pattern.callback.allowed_methods}
    assert "/v1/chat/completions" in routes and len(routes) >= 6
    documented = {path: set(operations) - {"parameters", "summary", "description"}
                  for path, operations in document["paths"].items()}
    assert documented == routes


# 2. schemathesis against the document. ---------------------------------------------------------------------------

SCHEMA = schemathesis.openapi.from_path(OPENAPI_DOCUMENT)
SCHEMA.config.generation.update(modes=["positive", "negative"], max_examples=50 * SCALE, deterministic=SCALE == 1)
UNAUTHENTICATED = schemathesis.openapi.from_path(OPENAPI_DOCUMENT)
UNAUTHENTICATED.config.generation.update(modes=["positive", "negative"], max_examples=15 * SCALE,
                                         deterministic=SCALE == 1)


def openai_error_json(ctx, response, case):
    """Under /v1/ (and /api/), every refusal is OpenAI's error object with a JSON content type."""
    if case.path.startswith(JSON_PREFIXES) and response.status_code >= 400:
        assert_openai_error(response.status_code, response.headers.get("content-type", [""])[0], response.content,
                            f"{case.method} {case.path}")


def schema_valid_bodies_are_accepted(ctx, response, case):
    """positive_data_acceptance, but for what JSON Schema cannot say: `2.0` is an integer to JSON Schema, and a
    decimal number to OpenAI, whose 400 invalid_type the gateway answers too."""
    if response.status_code == 400 and isinstance(case.body, dict):
        param = (response.json().get("error") or {}).get("param")
        value = case.body.get(param)
        if isinstance(value, float) and value.is_integer():
            return None
    return positive_data_acceptance(ctx, response, case)


DOCUMENTED = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, unsupported_method, allow_header_conformance, openai_error_json]


@SCHEMA.parametrize()
@FUZZ
def test_the_gateway_answers_as_documented_with_a_key(case, sim, account):
    response = case.call(base_url=sim.base_url, headers={"Authorization": f"Bearer {account.key}"}, timeout=30)
    case.validate_response(response, checks=[*DOCUMENTED, negative_data_rejection, schema_valid_bodies_are_accepted,
                                             ignored_auth])


@UNAUTHENTICATED.parametrize()
@FUZZ
def test_the_gateway_answers_as_documented_without_a_key(case, gateway):
    response = case.call(base_url=gateway.base_url, timeout=30)
    case.validate_response(response, checks=DOCUMENTED)
    if case.path.startswith("/v1/") and not case.headers:
        assert response.status_code == 401, (case.method, case.path, response.status_code, response.text[:300])


# 3. hypothesis: bodies, headers, framing. ------------------------------------------------------------------------


@pytest.fixture(params=["api", "demo"])
def surface(request, sim, account):
    client = Surface(sim, account, request.param)
    yield client
    client.http.close()


@given(body=BODIES)
@examples(300)
def test_no_body_gets_a_5xx_or_a_refusal_that_is_not_openai_json(surface, body):
    note(f"body: {body[:3000]!r}")
    response = surface.post(body)
    where = f"POST {surface.path} {body[:300]!r}"
    assert_answer(surface.path, response.status_code, response.headers.get("content-type"), response.content, where)
    if surface.name == "api":
        # The document and validation.py agree: what its schema accepts is not refused as invalid, what it refuses
        # is. (The demo sets `stream` itself.)
        verdict = document_verdict(body)
        if verdict is True:
            assert response.status_code != 400, (where, response.text[:300])
        elif verdict is False:
            assert 400 <= response.status_code < 500, (where, response.status_code, response.text[:300])


@given(data=st.data())
@examples(300)
def test_no_headers_get_a_5xx_or_a_refusal_that_is_not_openai_json(sim, account, data):
    method, path, request, complete = data.draw(header_requests(account.key.encode()))
    head = method == b"HEAD"
    responses = exchange(sim.server.port, request, half_close=not complete, head=head)
    assert_raw_answers(method, path.encode(), responses, complete, request[:300])


@given(data=st.data())
@examples(300)
def test_no_framing_gets_a_5xx_or_a_refusal_that_is_not_openai_json(sim, account, data):
    target, request, complete = data.draw(framed_requests(account.key.encode()))
    method = request.split(b" ", 1)[0]
    responses = exchange(sim.server.port, request, half_close=not complete, head=method.upper() == b"HEAD")
    assert_raw_answers(method, target, responses, complete, request[:300])
