"""Where one attempt goes: a deployment of a model, resolved to a URL, a key and the provider's name for the model.

The catalogue (streaming/catalogue/) makes these from its records; a bare URL (the provider side's own tests, the
benchmarks) is a target too, with the gateway-wide settings. A target's `key` names its shared adaptive limit,
breaker and queue (permits.py): one per deployment.
"""

import dataclasses
from urllib.parse import urlsplit

from django.conf import settings

OPENAI_HOST = "api.openai.com"


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    url: str  # the provider's base URL, ending in /v1 (or wherever its API lives)
    api_key: str
    key: str  # the limiter's identity: one per deployment
    name: str  # "provider/model", for the ledger, the logs and the metrics' labels
    provider: str = "default"
    model: str | None = None  # the provider's name for the model; None: the one the client sent
    token_limit_field: str = "auto"  # "auto", "max_tokens" or "max_completion_tokens"
    connect_timeout: float | None = None  # None: UPSTREAM_CONNECT_TIMEOUT
    first_token_timeout: float | None = None  # None: UPSTREAM_FIRST_TOKEN_TIMEOUT
    deployment_id: int | None = None

    @classmethod
    def for_url(cls, url: str) -> "Target":
        return cls(url=url, api_key=settings.OPENAI_API_KEY, key=url, name=urlsplit(url).netloc or url)

    def limit_field(self) -> str:
        """The field a token limit goes in when the client set none."""
        field = self.token_limit_field if self.token_limit_field != "auto" else settings.UPSTREAM_TOKEN_LIMIT_FIELD
        return token_limit_field(self.url, field)

    def first_token_seconds(self) -> float:
        return self.first_token_timeout or settings.UPSTREAM_FIRST_TOKEN_TIMEOUT


def token_limit_field(url: str, field: str | None = None) -> str:
    """The field a token limit goes in when the client set none (UPSTREAM_TOKEN_LIMIT_FIELD, or a provider's own):
    "auto" is OpenAI's max_completion_tokens for OpenAI itself (its reasoning models refuse max_tokens) and max_tokens
    for any other server (some know no other)."""
    field = field or settings.UPSTREAM_TOKEN_LIMIT_FIELD
    if field != "auto":
        return field
    return "max_completion_tokens" if urlsplit(url).hostname == OPENAI_HOST else "max_tokens"


def as_targets(where) -> tuple[Target, ...]:
    """A URL, one target or several, as targets in the order to try them."""
    if isinstance(where, str):
        return (Target.for_url(where),)
    if isinstance(where, Target):
        return (where,)
    return tuple(where)
