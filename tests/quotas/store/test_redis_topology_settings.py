"""How an operator names a Redis Cluster or a Sentinel-managed Redis (docs/quotas.md, "When one Redis is not
enough"): config/settings.py run as a server runs it, with the environment a test gives it; contradictions are
refused at start-up, naming the variable."""

import runpy
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

SETTINGS = Path(__file__).resolve().parents[3] / "config" / "settings.py"
VARIABLES = ("REDIS_URL", "REDIS_CLUSTER", "REDIS_SENTINELS", "SLUICE_COUNTER_STORE")


def settings_for(monkeypatch, **environment):
    """The settings config/settings.py makes of this environment (the test's own otherwise)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SETTINGS))


def test_a_single_redis_is_as_before(monkeypatch):
    values = settings_for(monkeypatch, REDIS_URL="redis://10.0.0.5:6379/2")
    assert values["CACHES"]["default"]["OPTIONS"] == {"CLIENT_CLASS": "django_redis.client.DefaultClient"}
    assert values["CHANNEL_LAYERS"]["default"] == {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                                   "CONFIG": {"hosts": ["redis://10.0.0.5:6379/2"]}}
    assert (values["REDIS_CLUSTER"], values["REDIS_SENTINELS"]) == (False, [])


def test_a_cluster_is_any_node_and_redis_cluster(monkeypatch):
    values = settings_for(monkeypatch, REDIS_URL="redis://10.0.0.5:7000/0", REDIS_CLUSTER="1")
    assert values["REDIS_CLUSTER"] is True
    assert values["SLUICE_COUNTER_STORE"] == "quotas.store.redis.RedisStore"
    # Django's cache is not on the cluster (django-redis has no cluster client; Sluice keeps nothing in it).
    assert values["CACHES"]["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"
    # channels_redis's pub/sub layer: nothing stored, PUBLISH reaches every node.
    assert values["CHANNEL_LAYERS"]["default"] == {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                                   "CONFIG": {"hosts": ["redis://10.0.0.5:7000/0"]}}


def test_sentinels_and_the_master_groups_name(monkeypatch):
    values = settings_for(monkeypatch, REDIS_URL="rediss://:s3cret@mymaster/1",
                          REDIS_SENTINELS="10.0.0.5:26379, sentinel-b:26380")
    sentinels = [("10.0.0.5", 26379), ("sentinel-b", 26380)]
    assert values["REDIS_SENTINELS"] == sentinels
    assert values["CACHES"]["default"] == {
        "BACKEND": "django_redis.cache.RedisCache", "LOCATION": "rediss://:s3cret@mymaster/1",
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.SentinelClient", "SENTINELS": sentinels,
                    "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory"}}
    assert values["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"] == [
        {"sentinels": sentinels, "master_name": "mymaster", "db": 1, "password": "s3cret", "ssl": True}]


@pytest.mark.parametrize("environment, says", [
    ({"REDIS_CLUSTER": "1"}, "need REDIS_URL"),
    ({"REDIS_SENTINELS": "10.0.0.5:26379"}, "need REDIS_URL"),
    ({"REDIS_URL": "redis://mymaster/0", "REDIS_CLUSTER": "1", "REDIS_SENTINELS": "10.0.0.5:26379"},
     "exclude each other"),
    ({"REDIS_URL": "redis://10.0.0.5:7000/3", "REDIS_CLUSTER": "1"}, "database 0"),
    ({"REDIS_URL": "unix:///run/redis.sock", "REDIS_CLUSTER": "1"}, "database 0"),
    ({"REDIS_URL": "redis://10.0.0.5:6379/0", "REDIS_SENTINELS": "10.0.0.5:26379"}, "names the master group"),
    ({"REDIS_URL": "redis://mymaster/0", "REDIS_SENTINELS": "10.0.0.5"}, "not host:port"),
])
def test_contradictions_are_refused_at_start_up(monkeypatch, environment, says):
    with pytest.raises(ImproperlyConfigured, match=says):
        settings_for(monkeypatch, **environment)
