"""The counter store contract's fixture: every test here runs against the in-process store, a single Redis, a
three-node Redis Cluster (started once for the session) and a Sentinel-managed Redis (likewise)."""

import os

import pytest

from quotas.store.memory import MemoryStore
from tests.support import redis_servers


def redis_settings(url, cluster=False, sentinels=()):
    """The settings config/settings.py makes of REDIS_URL, REDIS_CLUSTER and REDIS_SENTINELS (for the store)."""
    from django.test import override_settings

    cache = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}}
    return override_settings(REDIS_URL=url, REDIS_CLUSTER=cluster, REDIS_SENTINELS=list(sentinels), CACHES=cache)


def require_redis_binaries():
    if not redis_servers.available():
        if os.environ.get("CI"):
            raise AssertionError(f"no redis-server/redis-cli at {redis_servers.REDIS_SERVER}")
        pytest.skip(f"no redis-server/redis-cli at {redis_servers.REDIS_SERVER}")


@pytest.fixture(scope="session")
def redis_cluster():
    """A three-node Redis Cluster of the session's own (tests/support/redis_servers.py)."""
    require_redis_binaries()
    with redis_servers.running(redis_servers.Cluster) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel_group():
    """A master, its replica and a sentinel, for the session (a test that fails over starts its own)."""
    require_redis_binaries()
    with redis_servers.running(redis_servers.SentinelGroup) as group:
        yield group


def deployment(request, kind):
    """The settings of an emptied Redis deployment of `kind` for one test."""
    if kind == "redis":
        return redis_settings(request.getfixturevalue("redis_url"))
    if kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return redis_settings(cluster.url, cluster=True)
    group = request.getfixturevalue("redis_sentinel_group")
    redis_servers.ask(group.master.port, lambda client: client.flushall())
    return redis_settings(group.url, sentinels=group.sentinels)


# The Redis deployments carry the `redis` mark: CI's embedded-default phase (SQLite, `-m "not redis"`) runs the
# contract against the in-process store only; they ran in the PostgreSQL phase.
@pytest.fixture(params=["memory", *(pytest.param(kind, marks=pytest.mark.redis)
                                    for kind in ("redis", "cluster", "sentinel"))])
async def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    from quotas.store.redis import RedisStore

    with deployment(request, request.param):
        store = RedisStore()
        yield store
        await store.aclose()
