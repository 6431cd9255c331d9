"""API key authentication for /v1/: `Authorization: Bearer sk-sluice-…`."""

from asgiref.sync import sync_to_async
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
    # Look up by the hash (the unique index); the stored hash is compared in constant time.
    key = await ApiKey.objects.select_related("user").filter(hashed_key=hash_key(raw)).afirst()
    if key is None or not key.matches(raw) or not key.user.is_active:
        raise unauthorized("Incorrect API key provided.")
    if not key.is_active:
        raise unauthorized("This API key has been revoked or has expired.")
    await _touch(key)
    return key


@sync_to_async
def _touch(key):
    # At most one write a minute per key.
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
