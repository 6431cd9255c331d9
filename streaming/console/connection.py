"""The admin's "Test connection" for a provider: its GET /models, and the time to the first token of a one-token
streamed chat completion, through the provider side the gateway uses (streaming/provider/client.py) but outside
routing, the shared limit and the breaker, so that a failing or disabled provider can be tested too.

What an operator sees is Sluice's own wording of a failure (UpstreamError's message, with any provider text
scrubbed): never the key, the provider's raw answer or a stack trace.
"""

import asyncio
import dataclasses
import logging
import os
import time
import uuid

from streaming.catalogue.secrets import SecretsUnavailable
from streaming.catalogue.snapshot import DeploymentSpec
from streaming.provider import client
from streaming.provider.errors import UpstreamError
from streaming.provider.events import ERROR

logger = logging.getLogger(__name__)

STEP_SECONDS = 10.0  # each step's bound: the admin's page waits for the answer
LISTED = 8  # model ids named in the message
PROMPT = "Say hi."


@dataclasses.dataclass(frozen=True)
class Result:
    provider: str
    models: list[str] | None = None  # what GET /models listed (None: it failed)
    models_error: str = ""
    model: str | None = None  # the provider's model the completion asked for
    first_token_ms: float | None = None
    completion_error: str = ""
    problem: str = ""  # why nothing could be tried

    @property
    def ok(self) -> bool:
        return self.models is not None and self.first_token_ms is not None

    @property
    def failed(self) -> bool:
        return self.models is None and self.first_token_ms is None

    def describe(self) -> str:
        if self.problem:
            return f"{self.provider}: {self.problem}"
        if self.models is None:
            parts = [f"GET /models failed: {self.models_error}"]
        else:
            shown = ", ".join(client.scrub(name)[:100] for name in self.models[:LISTED])
            more = f" and {len(self.models) - LISTED} more" if len(self.models) > LISTED else ""
            parts = [f"{len(self.models)} model(s): {shown}{more}" if self.models else "no models listed"]
        if self.first_token_ms is not None:
            parts.append(f"first token of {self.model} in {self.first_token_ms:.0f} ms")
        else:
            parts.append(f"chat completion{f' of {self.model}' if self.model else ''} failed: {self.completion_error}")
        return f"{self.provider}: " + "; ".join(parts) + "."


def api_key(provider) -> str:
    """The key the gateway would send (raises SecretsUnavailable when a stored one cannot be decrypted)."""
    if provider.api_key_encrypted:
        return provider.stored_api_key()
    return os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""


def upstream_model(provider) -> str | None:
    """The provider's name of the model to time: its first enabled deployment's (else any deployment's)."""
    deployment = provider.deployments.order_by("-enabled", "priority", "pk").first()
    return deployment.upstream_model if deployment else None


def test(providers, scope) -> list[Result]:
    """Test each provider, at once (synchronous: for the admin's thread, which has no event loop; the clients made
    are closed with the loop)."""
    ready, results = [], {}
    for provider in providers:
        try:
            key = api_key(provider)
        except SecretsUnavailable as exc:
            results[provider.pk] = Result(provider.name, problem=f"{exc} Enter the key again, or put the secrets key "
                                                                 f"it was stored with back in SLUICE_SECRETS_KEY.")
            continue
        spec = DeploymentSpec(None, provider.name, provider.base_url, key, upstream_model(provider) or "",
                              token_limit_field=provider.token_limit_field, limit_scope=provider.limit_scope,
                              connect_timeout=provider.connect_timeout,
                              first_token_timeout=provider.first_token_timeout)
        ready.append((provider, spec.target(provider.base_url or client.provider_url(scope))))
    if ready:
        for (provider, _), result in zip(ready, asyncio.run(_probe_all([target for _, target in ready]))):
            results[provider.pk] = result
    return [results[provider.pk] for provider in providers]


async def _probe_all(targets):
    try:
        return await asyncio.gather(*(_probe(target) for target in targets))
    finally:
        await client.close_clients()


async def _probe(target) -> Result:
    models, models_error = None, ""
    try:
        async with asyncio.timeout(STEP_SECONDS):
            models = await client.list_models(target)
    except Exception as exc:
        models_error = _explain(exc, target)
    model = target.model or (models[0] if models else None)
    if model is None:
        return Result(target.provider, models, models_error, completion_error="no deployment or listed model to ask")
    try:
        first_token_ms = await _first_token_ms(dataclasses.replace(target, model=model))
    except Exception as exc:
        return Result(target.provider, models, models_error, model, completion_error=_explain(exc, target))
    return Result(target.provider, models, models_error, model, first_token_ms)


async def _first_token_ms(target) -> float:
    body = {"model": target.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            target.limit_field(): 1}
    started = time.perf_counter()
    async with asyncio.timeout(min(STEP_SECONDS, target.first_token_seconds())):
        stream = await client.open_stream(target, body, f"sluice-test-{uuid.uuid4().hex[:12]}")
        try:
            while (batch := await stream.read_batch()) is not None:
                for event in batch:
                    if event.kind == ERROR:
                        raise UpstreamError(502, "upstream_error", "The provider failed before its first token.")
                    if event.begins_answer:
                        return (time.perf_counter() - started) * 1000
        finally:
            await stream.aclose()
    raise UpstreamError(502, "upstream_error", "The provider ended the answer before its first token.")


def _explain(exc, target) -> str:
    if isinstance(exc, UpstreamError):
        return f"{exc.message} ({exc.code})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {STEP_SECONDS:g} s (upstream_timeout)"
    logger.warning("connection test of provider %s failed", target.provider, exc_info=True)
    return f"an unexpected {type(exc).__name__}; the server's log has the details"
