"""One exception per kind of refusal, in the domain's terms: no HTTP, no wire format.

The gateway turns each into OpenAI's error JSON (or a final SSE error event once a stream has begun) in one
place, streaming/errors.py. `code` is what the ledger records as a refusal's reason, and what the client sees.
"""

from dataclasses import dataclass
from datetime import datetime


class QuotaRefusal(Exception):
    """A request the quota domain refuses."""

    code = ""


@dataclass(eq=False)
class InvalidApiKey(QuotaRefusal):
    """No key, an unknown key, a revoked or expired one, or one whose user is inactive."""

    reason: str  # MISSING, INCORRECT or INACTIVE
    code = "invalid_api_key"

    MISSING = "missing"
    INCORRECT = "incorrect"
    INACTIVE = "inactive"
    NOT_A_MEMBER = "not_a_member"  # the key names a team its user has left


@dataclass(eq=False)
class Suspended(QuotaRefusal):
    code = "account_suspended"


@dataclass(eq=False)
class RateLimited(QuotaRefusal):
    limit: int  # requests per minute
    retry_after_seconds: float
    code = "rate_limit_exceeded"


@dataclass(eq=False)
class ConcurrencyLimited(QuotaRefusal):
    limit: int  # concurrent streams
    retry_after_seconds: float = 1.0
    code = "concurrency_limit_exceeded"


@dataclass(eq=False)
class QuotaExceeded(QuotaRefusal):
    """A window ran out: `scope` is the one that did — a token window ("day" or "month") or a money budget's
    ("budget_day" or "budget_month") — of `owner` (the user, their key, their team's pool or their cap in it), with
    its own reset. The same code for all (OpenAI's for a spent quota or budget); the message names the window."""

    scope: str
    retry_after_seconds: float
    resets_at: datetime
    owner: str = "user"  # whose window: the user's, or the key's, the team's pool, the member's cap in it
    owner_name: str = ""  # the key's prefix or the team's name
    code = "insufficient_quota"


@dataclass(eq=False)
class ModelNotAllowed(QuotaRefusal):
    model: str
    code = "model_not_found"


@dataclass(eq=False)
class CounterStoreDown(QuotaRefusal):
    """The counter store cannot be reached and this limit fails closed; `limit` names which one."""

    limit: str  # "rate limit", "concurrency limit" or "quota"
    retry_after_seconds: float = 5.0
    code = "service_unavailable"
