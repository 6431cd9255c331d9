"""One process's picture of the catalogue: immutable, built from the records (registry.py) or, while there are none,
from OPENAI_BASE_URL / OPENAI_API_KEY / SLUICE_MODELS; resolving a requested name to a Route is a dict lookup and,
for a model with several deployments, a sort of a few (routing.py)."""

import bisect
import dataclasses
import os
import time

from django.conf import settings

from quotas.domain.money import Price
from streaming.provider.targets import Target

from .routing import Route, order

OPENAI_URL = "https://api.openai.com/v1"
# The built-in simulator's provider: an empty base URL, resolved per request to this process's own address.
SIMULATOR = ""


@dataclasses.dataclass(frozen=True, slots=True)
class DeploymentSpec:
    id: int | None
    provider: str
    base_url: str  # SIMULATOR ("") or a URL
    api_key: str
    upstream_model: str
    weight: int = 1
    priority: int = 1
    token_limit_field: str = "auto"
    limit_scope: str = "deployment"
    connect_timeout: float | None = None
    first_token_timeout: float | None = None

    def target(self, url: str) -> Target:
        key = url if self.limit_scope == "provider" else f"{url}#{self.upstream_model}"
        return Target(url=url, api_key=self.api_key, key=key, name=f"{self.provider}/{self.upstream_model}",
                      provider=self.provider, model=self.upstream_model, token_limit_field=self.token_limit_field,
                      connect_timeout=self.connect_timeout, first_token_timeout=self.first_token_timeout,
                      deployment_id=self.id)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    deployments: tuple[DeploymentSpec, ...]
    aliases: tuple[str, ...] = ()
    context_length: int | None = None
    field_rules: dict = dataclasses.field(default_factory=dict)
    prices: tuple[tuple[float, Price], ...] = ()  # (effective from, as a Unix time; the price), oldest first

    def price_at(self, now: float) -> Price | None:
        """The price in effect at `now`: the latest that began at or before it."""
        index = bisect.bisect_right(self.prices, now, key=lambda entry: entry[0])
        return self.prices[index - 1][1] if index else None


class Catalogue:
    """The models by public name and alias; `route` makes a request's plan."""

    def __init__(self, models, source="records"):
        self.models = {model.name: model for model in models}
        self.lookup = dict(self.models)
        for model in models:
            for alias in model.aliases:
                self.lookup.setdefault(alias, model)
        self.names = tuple(self.models)  # in the records' order (by name), or SLUICE_MODELS'
        self.source = source  # "records", or "settings" while the database has none
        self._targets = {}  # (deployment, url) -> Target: made once per simulator address

    def model(self, requested) -> ModelSpec | None:
        return self.lookup.get(requested) if isinstance(requested, str) else None

    def route(self, requested, simulator_url: str, sticky: str | None = None) -> Route:
        model = self.model(requested)
        if model is None:
            return Route(None, (), self.names)
        targets = tuple(self._target(spec, simulator_url) for spec in model.deployments)
        if len(targets) > 1:
            targets = order(targets, [spec.weight for spec in model.deployments],
                            [spec.priority for spec in model.deployments], sticky)
        return Route(model.name, targets, self.names, model.price_at(time.time()) if model.prices else None)

    def _target(self, spec, simulator_url):
        url = spec.base_url or simulator_url
        target = self._targets.get((spec, url))
        if target is None:
            target = self._targets[(spec, url)] = spec.target(url)
        return target


def settings_key():
    return (settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY, tuple(settings.SLUICE_MODELS))


def from_settings() -> Catalogue:
    """OPENAI_BASE_URL / OPENAI_API_KEY / SLUICE_MODELS as a catalogue: one provider serving every model under its
    own name, with one limit for all of them (as before the catalogue existed)."""
    provider = bootstrap_provider()
    models = [ModelSpec(name, (DeploymentSpec(None, provider["name"], provider["base_url"], settings.OPENAI_API_KEY,
                                              name, limit_scope="provider"),))
              for name in dict.fromkeys(settings.SLUICE_MODELS)]
    return Catalogue(models, source="settings")


def bootstrap_provider() -> dict:
    """The provider record the settings describe."""
    if settings.OPENAI_BASE_URL or settings.OPENAI_API_KEY:
        return {"name": "default", "base_url": settings.OPENAI_BASE_URL or OPENAI_URL,
                "api_key_env": "OPENAI_API_KEY" if settings.OPENAI_API_KEY else "", "limit_scope": "provider"}
    return {"name": "simulator", "base_url": SIMULATOR, "api_key_env": "", "limit_scope": "provider"}


def from_records(providers, models, deployments, prices=()) -> Catalogue:
    """The enabled records as a catalogue (a disabled provider's deployments are left out; a model with none left
    is unknown to clients)."""
    by_price = {}
    for price in sorted(prices, key=lambda p: p.effective_from):
        by_price.setdefault(price.model_id, []).append((price.effective_from.timestamp(), Price(
            input=price.input, output=price.output, cached_input=price.cached_input, reasoning=price.reasoning,
            cache_write=price.cache_write, id=price.pk)))
    keys = {provider.pk: _api_key(provider) for provider in providers}
    by_model = {}
    for deployment in deployments:
        provider = deployment.provider
        if not (deployment.enabled and provider.enabled):
            continue
        by_model.setdefault(deployment.model_id, []).append(DeploymentSpec(
            deployment.pk, provider.name, provider.base_url, keys.get(provider.pk, ""), deployment.upstream_model,
            deployment.weight, deployment.priority, provider.token_limit_field, provider.limit_scope,
            provider.connect_timeout, provider.first_token_timeout))
    specs = [ModelSpec(model.name, tuple(by_model[model.pk]), tuple(model.aliases or ()), model.context_length,
                       dict(model.field_rules or {}), tuple(by_price.get(model.pk, ())))
             for model in models if model.enabled and by_model.get(model.pk)]
    return Catalogue(specs)


def _api_key(provider) -> str:
    from .secrets import SecretsUnavailable

    if provider.api_key_encrypted:
        try:
            return provider.stored_api_key()
        except SecretsUnavailable:
            return ""  # the provider answers 401: upstream_auth, and the admin's test shows why
    return os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
