"""Errors in OpenAI's wire format, and the one mapping to them (and the rate-limit headers' duration format).

Every refusal under /v1/ becomes ``{"error": {"message", "type", "param", "code"}}`` with the right status; after
an SSE body has started, the same error becomes a final ``data: {"error": ...}`` event instead. The quota domain
raises its own exceptions (quotas/domain/exceptions.py) and the provider side raises `UpstreamError`
(streaming/provider/errors.py): `api_error` below is the only place either is given a status, a type and a message.
"""

import json
from dataclasses import dataclass, field

from django.conf import settings
from django.http import JsonResponse

from quotas.domain import exceptions as quota
from streaming.provider.errors import UpstreamError


@dataclass(eq=False)
class ApiError(Exception):
    message: str
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after_seconds: float | None = None
    headers: dict = field(default_factory=dict)

    def __str__(self):
        return self.message

    def payload(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        response = JsonResponse(self.payload(), status=self.status)
        if self.retry_after_seconds is not None:
            response["Retry-After"] = str(max(1, round(self.retry_after_seconds + 0.499)))
        for name, value in self.headers.items():
            response[name] = value
        return response

    def sse_event(self) -> bytes:
        return b"data: " + json.dumps(self.payload()).encode() + b"\n\n"


def duration(seconds: float) -> str:
    """OpenAI's format for the x-ratelimit-reset-* headers: 1s, 6m0s, 1h2m3s."""
    seconds = max(0, int(seconds + 0.999))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def invalid(message, param=None, code=None):
    return ApiError(message, status=400, param=param, code=code)


def not_found(message, code="not_found"):
    return ApiError(message, status=404, code=code)


_KEY_MESSAGES = {
    quota.InvalidApiKey.MISSING: "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
    quota.InvalidApiKey.INCORRECT: "Incorrect API key provided.",
    quota.InvalidApiKey.INACTIVE: "This API key has been revoked or has expired.",
    quota.InvalidApiKey.NOT_A_MEMBER: "This API key spends from a team its user no longer belongs to.",
}


def _exceeded(exc) -> str:
    """Which window ran out, in words: whose (the user's, the key's, the team's pool, the member's cap in it), which
    period, tokens or money."""
    period = "daily" if exc.scope.endswith("day") else "monthly"
    money = exc.scope.startswith("budget_")
    what = f"budget ({settings.SLUICE_CURRENCY})" if money else "token quota"
    if exc.owner == "key":
        return f"This API key ({exc.owner_name}…) reached its {period} spend limit ({settings.SLUICE_CURRENCY})."
    if exc.owner == "team":
        return f"The team '{exc.owner_name}' used up its {period} {what}."
    if exc.owner == "member":
        return f"You reached your {period} cap ({settings.SLUICE_CURRENCY}) in the team '{exc.owner_name}'."
    return f"You exceeded your {period} {what}."


def api_error(exc: Exception) -> ApiError:
    """The OpenAI-format error for a domain refusal or a provider failure (an ApiError is returned as it is)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UpstreamError):
        return ApiError(exc.message, status=exc.status, type="server_error" if exc.status >= 500 else "upstream_error",
                        code=exc.code, param=exc.param, retry_after_seconds=exc.retry_after_seconds)
    if isinstance(exc, quota.QuotaExceeded):
        return ApiError(f"{_exceeded(exc)} It resets at {exc.resets_at.isoformat()}.", status=429,
                        type="insufficient_quota", code=exc.code, retry_after_seconds=exc.retry_after_seconds)
    if isinstance(exc, quota.RateLimited):
        return ApiError(f"Rate limit reached: {exc.limit} requests per minute. "
                        f"Retry after {exc.retry_after_seconds:.0f} s.", status=429, type="requests", code=exc.code,
                        retry_after_seconds=exc.retry_after_seconds)
    if isinstance(exc, quota.ConcurrencyLimited):
        return ApiError(f"Too many concurrent requests: your limit is {exc.limit} at a time. Wait for one to finish.",
                        status=429, type="requests", code=exc.code, retry_after_seconds=exc.retry_after_seconds)
    if isinstance(exc, quota.InvalidApiKey):
        return ApiError(_KEY_MESSAGES[exc.reason], status=401, code=exc.code)
    if isinstance(exc, quota.Suspended):
        return ApiError("This account is suspended. Contact the operator.", status=403, type="permission_error",
                        code=exc.code)
    if isinstance(exc, quota.ModelNotAllowed):
        return ApiError(f"The model '{exc.model}' does not exist or you do not have access to it.", status=404,
                        param="model", code=exc.code)
    if isinstance(exc, quota.CounterStoreDown):
        return ApiError(f"The {exc.limit} service is temporarily unavailable. Retry shortly.", status=503,
                        type="server_error", code=exc.code, retry_after_seconds=exc.retry_after_seconds)
    raise TypeError(f"no OpenAI error for {type(exc).__name__}") from exc


# What api_error maps: the exceptions a view or the relay turns into an error response or event.
MAPPED = (ApiError, UpstreamError, quota.QuotaRefusal)
