"""API key authentication for /v1/: `Authorization: Bearer sk-sluice-…`."""

from django.utils import timezone

from streaming.errors import ApiError

from .db import database
from .models import ApiKey, hash_key
from .services import limits_of


def unauthorized(message):
    return ApiError(message, status=401, type="invalid_request_error", code="invalid_api_key")


async def authenticate(request):
    """(the active key in the request's Authorization header, with its user; the user's limits), or a 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    return await _look_up(raw)


@database
def _look_up(raw):
    # Look up by the hash (the unique index); the stored hash is compared in constant time. The user's
    # quota record and plan come in the same query: the limits are needed next.
    try:  # get(), not first(): the hash is unique, and first()'s ORDER BY costs a sort to compile and to run
        key = ApiKey.objects.select_related("user", "user__quota", "user__quota__plan").get(hashed_key=hash_key(raw))
    except ApiKey.DoesNotExist:
        key = None
    if key is None or not key.matches(raw) or not key.user.is_active:
        raise unauthorized("Incorrect API key provided.")
    if not key.is_active:
        raise unauthorized("This API key has been revoked or has expired.")
    # At most one write a minute per key.
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key, limits_of(getattr(key.user, "quota", None))
