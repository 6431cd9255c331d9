"""The choice among a model's deployments: the order in which one request tries them.

Deployments of the best (lowest) priority come first, ordered by weight — a weighted random order, or with a
stickiness key (the request's `prompt_cache_key` or `user`) a weighted rendezvous hash, so that a conversation keeps
to one deployment and its prompt cache while the deployments stay the same. Within a priority, deployments whose
breaker is open go last (after every healthy one of every priority): tried only if nothing else is left. The
provider side (streaming/provider/retries.py) walks the order: the next deployment on a connection error, a 429 or a
5xx before the first byte, never after.
"""

import dataclasses
import hashlib
import math
import random

from django.conf import settings

from quotas.domain.money import Price
from streaming.provider.permits import get_upstream
from streaming.provider.targets import Target, as_targets


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """One request's plan: the model's public name (None: no such model) and the targets to try, in order."""

    name: str | None
    targets: tuple[Target, ...]
    names: tuple[str, ...]  # every public model name the catalogue has (a plan's allowed_models are among these)
    price: Price | None = None  # the model's price when the request began (quotas/domain/money.py)

    def allows(self, limits) -> bool:
        return self.name is not None and bool(self.targets) and limits.allows_model(self.name, self.names)

    @classmethod
    def for_url(cls, model, url) -> "Route":
        """A provider URL serving SLUICE_MODELS (tests and benchmarks that bypass the catalogue)."""
        return cls(model, as_targets(url), tuple(settings.SLUICE_MODELS))


def healthy(target: Target) -> bool:
    return get_upstream(target.key).healthy()


def order(candidates, weights, priorities, sticky: str | None = None, is_healthy=healthy, rng=random.random):
    """`candidates` (targets) in the order to try them; `weights` and `priorities` are parallel to them."""
    if len(candidates) == 1:
        return tuple(candidates)
    ranked = []  # (unhealthy, priority, -score, index)
    for index, target in enumerate(candidates):
        # Efraimidis–Spirakis: u ** (1 / w), largest first, is a weighted random order; with a stickiness key, u is
        # the key's hash with the target's (rendezvous hashing), the same for every request that carries the key.
        u = _unit(sticky, target.key) if sticky else rng()
        score = math.log(max(u, 1e-300)) / weights[index]
        ranked.append((not is_healthy(target), priorities[index], -score, index))
    ranked.sort()
    return tuple(candidates[index] for *_, index in ranked)


def _unit(sticky: str, key: str) -> float:
    digest = hashlib.blake2b(f"{sticky}\0{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest) + 1) / (2**64 + 1)


def sticky_key(body) -> str | None:
    """The request's stickiness key: its prompt_cache_key, else its user (OpenAI's fields), when a string."""
    if not settings.SLUICE_STICKY_ROUTING or not isinstance(body, dict):
        return None
    for name in ("prompt_cache_key", "user"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    return None
