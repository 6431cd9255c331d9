"""The catalogue as quotas' console reads it (quotas/domain/catalogue.py; registered by streaming/apps.py): the public
model names plans choose from, and each deployment with its record in the counter store for the dashboard."""

from quotas.domain.catalogue import Deployment
from streaming.catalogue import registry
from streaming.provider.client import provider_url
from streaming.provider.permits import store_key


def model_names():
    return registry.current_sync().names


def deployments(scope):
    """Each deployment once (by its ledger name), with the models it serves. The built-in simulator's address is
    this process's own (`scope`: the request's), as the gateway resolves it per request."""
    simulator = provider_url(scope)
    found = {}
    for model in registry.current_sync().models.values():
        for spec in model.deployments:
            target = spec.target(spec.base_url or simulator)
            seen = found.get(target.name)
            models = (*seen.models, model.name) if seen else (model.name,)
            found[target.name] = Deployment(target.name, store_key(target.key), models)
    return sorted(found.values(), key=lambda deployment: deployment.name)
