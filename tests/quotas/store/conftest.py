"""The counter store contract's fixture: every test here runs against the in-process store and Redis."""

import pytest

from quotas.store.memory import MemoryStore


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    from django.test import override_settings

    from quotas.store.redis import RedisStore

    with override_settings(REDIS_URL=url, CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache",
                                                              "LOCATION": url}}):
        store = RedisStore()
        yield store
        await store.client.aclose()
