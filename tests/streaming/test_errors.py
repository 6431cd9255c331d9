"""streaming/errors.py: the one mapping from domain refusals and provider failures to OpenAI's error format."""

import json
from datetime import UTC, datetime

import pytest

from quotas.domain import exceptions as quota
from streaming.errors import ApiError, api_error
from streaming.provider.errors import UpstreamError

RESET = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("refusal, status, type_, code, words", [
    (quota.QuotaExceeded("month", 3600.2, RESET), 429, "insufficient_quota", "insufficient_quota",
     "monthly token quota. It resets at 2027-01-01T00:00:00+00:00"),
    (quota.QuotaExceeded("day", 10, RESET), 429, "insufficient_quota", "insufficient_quota", "daily token quota"),
    (quota.RateLimited(7, 12.4), 429, "requests", "rate_limit_exceeded", "7 requests per minute"),
    (quota.ConcurrencyLimited(2), 429, "requests", "concurrency_limit_exceeded", "your limit is 2 at a time"),
    (quota.InvalidApiKey(quota.InvalidApiKey.MISSING), 401, "invalid_request_error", "invalid_api_key",
     "You didn't provide an API key"),
    (quota.InvalidApiKey(quota.InvalidApiKey.INACTIVE), 401, "invalid_request_error", "invalid_api_key", "revoked"),
    (quota.Suspended(), 403, "permission_error", "account_suspended", "suspended"),
    (quota.ModelNotAllowed("gpt-x"), 404, "invalid_request_error", "model_not_found", "'gpt-x' does not exist"),
    (quota.CounterStoreDown("quota"), 503, "server_error", "service_unavailable", "quota service"),
    (UpstreamError(502, "upstream_error", "The upstream provider failed."), 502, "server_error", "upstream_error",
     "provider failed"),
    (UpstreamError(400, "upstream_rejected", "rejected"), 400, "upstream_error", "upstream_rejected", "rejected"),
])
def test_each_refusal_has_one_openai_error(refusal, status, type_, code, words):
    error = api_error(refusal)
    assert (error.status, error.type, error.code) == (status, type_, code)
    assert words in error.message
    body = json.loads(error.response().content)
    assert body["error"] == {"message": error.message, "type": type_, "param": error.param, "code": code}
    # After an SSE body has begun, the same error is the stream's last event.
    assert json.loads(error.sse_event()[len(b"data: "):]) == body


def test_retry_after_comes_from_the_refusal_itself():
    response = api_error(quota.QuotaExceeded("month", 3600.2, RESET)).response()
    assert response["Retry-After"] == "3601"
    assert api_error(quota.RateLimited(7, 12.4)).response()["Retry-After"] == "13"


def test_an_api_error_maps_to_itself_and_anything_else_is_a_programming_error():
    error = ApiError("bad", code="x")
    assert api_error(error) is error
    with pytest.raises(TypeError):
        api_error(ValueError("not a refusal"))
