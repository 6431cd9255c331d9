"""API key authentication for /v1/: `Authorization: Bearer sk-sluice-…`."""

from django.utils import timezone

from streaming.errors import ApiError

from .models import ApiKey, hash_key


def unauthorized(message):
    return ApiError(message, status=401, type="invalid_request_error", code="invalid_api_key")


async def authenticate(request) -> ApiKey:
    """The active key in the request's Authorization header (with its user), or a 401 ApiError."""
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    # Look up by the hash (the unique index); the stored hash is compared in constant time. The user's
    # quota record and plan come in the same query: the middleware needs them next.
    key = await (ApiKey.objects.select_related("user", "user__quota", "user__quota__plan")
                 .filter(hashed_key=hash_key(raw)).afirst())
    if key is None or not key.matches(raw) or not key.user.is_active:
        raise unauthorized("Incorrect API key provided.")
    if not key.is_active:
        raise unauthorized("This API key has been revoked or has expired.")
    # At most one write a minute per key.
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        await ApiKey.objects.filter(pk=key.pk).aupdate(last_used_at=now)
        key.last_used_at = now
    return key
