"""One exception per kind of refusal; streaming.errors turns them into OpenAI error JSON."""

from streaming.errors import ApiError


def rate_limited(retry_after_seconds, limit):
    return ApiError(
        f"Rate limit reached: {limit} requests per minute. Retry after {retry_after_seconds:.0f} s.",
        status=429, type="requests", code="rate_limit_exceeded", retry_after_seconds=retry_after_seconds)


def concurrency_limited(limit, retry_after_seconds=1.0):
    return ApiError(
        f"Too many concurrent requests: your limit is {limit} at a time. Wait for one to finish.",
        status=429, type="requests", code="concurrency_limit_exceeded", retry_after_seconds=retry_after_seconds)


def insufficient_quota(scope, reset_seconds, reset_at):
    return ApiError(
        f"You exceeded your {'daily' if scope == 'day' else 'monthly'} token quota. "
        f"It resets at {reset_at.isoformat()}.",
        status=429, type="insufficient_quota", code="insufficient_quota", retry_after_seconds=reset_seconds)


def suspended():
    return ApiError("This account is suspended. Contact the operator.", status=403,
                    type="permission_error", code="account_suspended")


def store_unavailable(what):
    return ApiError(f"The {what} service is temporarily unavailable. Retry shortly.", status=503,
                    type="server_error", code="service_unavailable", retry_after_seconds=5)
