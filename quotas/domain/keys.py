"""API keys: who is behind a raw key (`sk-sluice-…`), and their limits."""

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.utils import timezone

from ..models import ApiKey, hash_key
from .db import PreparedQuery, database
from .exceptions import InvalidApiKey
from .policy import Limits
from .selectors import KEY_COLUMNS, caller_limits, key_limits, with_pool_columns

COLUMNS = ("id", "user_id", "hashed_key", "expires_at", "revoked_at", "last_used_at", "user__is_active",
           *KEY_COLUMNS, "username")
# The key, its user, its team and the user's membership in it, by the hash (the unique index). Compiled once per
# database thread (quotas/domain/db.py): the ORM's compilation of the joins cost several times the query itself on
# every request.
_key_row = PreparedQuery(
    lambda hashed: with_pool_columns(ApiKey.objects.filter(hashed_key=hashed)).values_list(
        *COLUMNS[:-1], f"user__{get_user_model().USERNAME_FIELD}"),
    "0" * 64)


@dataclass(frozen=True)
class KeyHolder:
    """The caller behind a valid API key, and their limits."""

    key_id: int
    user_id: int
    username: str
    limits: Limits


@database
def authenticate(raw: str) -> KeyHolder:
    """The holder of the active key `raw`, or InvalidApiKey."""
    if not raw:
        raise InvalidApiKey(InvalidApiKey.MISSING)
    rows = _key_row.rows(hash_key(raw))
    if not rows:
        raise InvalidApiKey(InvalidApiKey.INCORRECT)
    values = dict(zip(COLUMNS, rows[0]))
    key = ApiKey(id=values["id"], user_id=values["user_id"], hashed_key=values["hashed_key"],
                 expires_at=values["expires_at"], revoked_at=values["revoked_at"],
                 last_used_at=values["last_used_at"])
    # The stored hash is compared in constant time.
    if not key.matches(raw) or not values["user__is_active"]:
        raise InvalidApiKey(InvalidApiKey.INCORRECT)
    if not key.is_active:
        raise InvalidApiKey(InvalidApiKey.INACTIVE)
    if values["team_id"] is not None and values["member_id"] is None:
        raise InvalidApiKey(InvalidApiKey.NOT_A_MEMBER)
    # At most one write a minute per key.
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    # A key may be narrower than its user (only some of the plan's models) and adds its pools: its spend limits, its
    # team's pool, the member's cap.
    return KeyHolder(key_id=key.pk, user_id=key.user_id, username=values["username"],
                     limits=key_limits(caller_limits(key.user_id), values))
