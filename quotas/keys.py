"""API key authentication for /v1/: `Authorization: Bearer sk-sluice-…`."""

from dataclasses import dataclass
from types import SimpleNamespace

from django.contrib.auth import get_user_model
from django.utils import timezone

from streaming.errors import ApiError

from .db import PreparedQuery, database
from .models import ApiKey, hash_key
from .policy import LIMIT_FIELDS
from .services import limits_of


def unauthorized(message):
    return ApiError(message, status=401, type="invalid_request_error", code="invalid_api_key")


@dataclass(frozen=True)
class Authenticated:
    """The caller behind a valid API key."""

    key_id: int
    user_id: int
    username: str


async def authenticate(request):
    """(the caller behind the active key in the request's Authorization header; the user's limits), or a 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    return await _look_up(raw)


QUOTA_FIELDS = (*LIMIT_FIELDS, "suspended", "timezone")
USERNAME = f"user__{get_user_model().USERNAME_FIELD}"
# The key, its user, and the user's quota record and plan (LEFT JOINs: a user may have no record), in one query.
COLUMNS = ("id", "user_id", "hashed_key", "expires_at", "revoked_at", "last_used_at", "user__is_active",
           USERNAME, "user__quota__id",
           *(f"user__quota__{name}" for name in QUOTA_FIELDS), *(f"user__quota__plan__{name}" for name in LIMIT_FIELDS))
# Compiled once per database thread (quotas/db.py): the ORM's compilation of these joins cost several times the
# query itself on every request.
_key_row = PreparedQuery(lambda hashed: ApiKey.objects.filter(hashed_key=hashed).values_list(*COLUMNS),
                         "0" * 64)


@database
def _look_up(raw):
    # Look up by the hash (the unique index); the stored hash is compared in constant time.
    rows = _key_row.rows(hash_key(raw))
    if not rows:
        raise unauthorized("Incorrect API key provided.")
    values = dict(zip(COLUMNS, rows[0]))
    key = ApiKey(id=values["id"], user_id=values["user_id"], hashed_key=values["hashed_key"],
                 expires_at=values["expires_at"], revoked_at=values["revoked_at"],
                 last_used_at=values["last_used_at"])
    if not key.matches(raw) or not values["user__is_active"]:
        raise unauthorized("Incorrect API key provided.")
    if not key.is_active:
        raise unauthorized("This API key has been revoked or has expired.")
    # At most one write a minute per key.
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    quota = None
    if values["user__quota__id"] is not None:
        quota = SimpleNamespace(**{name: values[f"user__quota__{name}"] for name in QUOTA_FIELDS},
                                plan=SimpleNamespace(**{name: values[f"user__quota__plan__{name}"]
                                                        for name in LIMIT_FIELDS}))
    return Authenticated(key_id=key.pk, user_id=key.user_id, username=values[USERNAME]), limits_of(quota)
