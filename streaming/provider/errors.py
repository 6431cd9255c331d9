"""What the provider side raises: the provider refused or failed (streaming/errors.py maps it for the client)."""

from dataclasses import dataclass


@dataclass(eq=False)
class UpstreamError(Exception):
    """The provider refused or failed; `status` is what the client should see."""

    status: int
    code: str
    message: str
    retry_after_seconds: float | None = None
    retryable: bool = False
    param: str | None = None  # the request field a provider's refusal names
    target: object = None  # the deployment (targets.Target) that answered or refused last, for the ledger

    def __str__(self):
        return self.message
