"""The order in which one request tries a model's deployments (streaming/catalogue/routing.py), and the catalogue's
stored keys (secrets.py): pure functions, in-process."""

import random
from collections import Counter

import pytest
from cryptography.fernet import Fernet
from django.test import override_settings

from streaming.catalogue import secrets
from streaming.catalogue.routing import order, sticky_key
from streaming.provider.targets import Target


def everyone(_):
    return True


def target(name):
    return Target(url=f"http://{name}/v1", api_key="", key=name, name=name)


A, B, C, D = (target(n) for n in "abcd")


def test_the_best_priority_comes_first_then_the_fallbacks():
    ranked = order([C, A, B], weights=[1, 1, 1], priorities=[3, 1, 2], is_healthy=everyone,
                   rng=random.Random(1).random)
    assert ranked == (A, B, C)


def test_weights_share_the_first_place_within_a_priority():
    rng = random.Random(7).random
    firsts = Counter(order([A, B, C], [6, 3, 1], [1, 1, 1], is_healthy=everyone, rng=rng)[0].name for _ in range(20_000))
    assert abs(firsts["a"] / 20_000 - 0.6) < 0.02 and abs(firsts["b"] / 20_000 - 0.3) < 0.02, firsts


def test_an_open_breaker_sends_its_deployment_behind_every_healthy_one():
    ranked = order([A, B, C], [10, 1, 1], [1, 1, 2], is_healthy=lambda t: t is not A, rng=random.Random(3).random)
    assert ranked[-1] is A and set(ranked[:2]) == {B, C} and ranked[0] is B


def test_a_stickiness_key_always_picks_the_same_deployment_and_keys_spread_by_weight():
    picks = {order([A, B, C, D], [1, 1, 1, 1], [1] * 4, sticky="conversation-9", is_healthy=everyone)[0]
             for _ in range(50)}
    assert len(picks) == 1
    firsts = Counter(order([A, B], [3, 1], [1, 1], sticky=f"k{i}", is_healthy=everyone)[0].name for i in range(8000))
    assert abs(firsts["a"] / 8000 - 0.75) < 0.03, firsts
    # Adding a deployment moves only the keys it wins (rendezvous hashing): none moves between a and b.
    moved = 0
    for i in range(3000):
        two = order([A, B], [1, 1], [1, 1], sticky=f"k{i}", is_healthy=everyone)[0]
        three = order([A, B, C], [1, 1, 1], [1] * 3, sticky=f"k{i}", is_healthy=everyone)[0]
        moved += three is not C and three is not two
    assert moved == 0


@pytest.mark.parametrize("body, key", [
    ({"prompt_cache_key": "p", "user": "u"}, "p"), ({"user": "u"}, "u"), ({"user": 5}, None), ({}, None),
    ({"prompt_cache_key": ""}, None)])
def test_the_stickiness_key_is_the_prompt_cache_key_else_the_user(body, key):
    assert sticky_key(body) == key
    with override_settings(SLUICE_STICKY_ROUTING=False):
        assert sticky_key(body) is None


def test_stored_keys_are_encrypted_and_a_rotated_key_still_opens_them():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(SLUICE_SECRETS_KEY=old):
        token = secrets.encrypt("sk-live-secret")
    assert "sk-live-secret" not in token
    with override_settings(SLUICE_SECRETS_KEY=f"{new},{old}"):
        assert secrets.decrypt(token) == "sk-live-secret"
    with override_settings(SLUICE_SECRETS_KEY=new), pytest.raises(secrets.SecretsUnavailable):
        secrets.decrypt(token)
    with override_settings(SLUICE_SECRETS_KEY="", SECRET_KEY_MISSING=True), pytest.raises(secrets.SecretsUnavailable):
        secrets.encrypt("sk-live-secret")
