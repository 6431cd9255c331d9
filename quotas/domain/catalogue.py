"""The catalogue as the domain and the console see it: the model names plans choose from, and the deployments the
dashboard reports on.

The catalogue itself (providers, models, deployments) lives in streaming/catalogue/, which quotas never imports: the
streaming app registers its readers here when it starts (streaming/apps.py), and until then, or in a process without
it, the models are SLUICE_MODELS and there are no deployments to show.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Deployment:
    """One deployment as the dashboard shows it."""

    name: str  # "provider/provider's model name": what the ledger's `deployment` column holds
    store_key: str  # its upstream record in the counter store (adaptive limit, breaker)
    models: tuple[str, ...] = ()  # the public model names it serves


class _Source:
    model_names: Callable[[], Sequence[str]] | None = None
    deployments: Callable[[dict], Sequence[Deployment]] | None = None


_source = _Source()


def set_source(model_names=None, deployments=None):
    """Register the catalogue's readers: `model_names()` and `deployments(scope)` (the request's ASGI scope, or {}:
    a deployment's record may depend on the address this process serves on)."""
    _source.model_names = model_names
    _source.deployments = deployments


def model_names() -> tuple[str, ...]:
    """The public model names, in the catalogue's order."""
    if _source.model_names is None:
        return tuple(settings.SLUICE_MODELS)
    return tuple(_source.model_names())


def deployments(scope=None) -> list[Deployment]:
    return [] if _source.deployments is None else list(_source.deployments(scope or {}))
