"""The counter store behind Redis Sentinel (issue 20, item 4): a real master, its replica and a sentinel
(tests/support/redis_servers.py); the master killed with SIGKILL while the store holds pooled connections to it.

Issue 14's rules across the failover: while there is no master, operations fail with StoreUnavailable (promptly);
once the sentinel names the new master the next operation works (the stale connections are replaced before a command
is written to them); nothing is applied twice (a failed operation never ran, and none is resent); and no counter is
lost that the replica had (what the master acknowledged but had not yet replicated would be: docs/quotas.md).
"""

import asyncio
import time

import pytest
from channels_redis.core import RedisChannelLayer
from django.test import override_settings

from quotas.store import StoreUnavailable, WindowSpec
from quotas.store.redis import RedisStore
from tests.quotas.store.conftest import redis_settings, require_redis_binaries
from tests.quotas.store.test_redis_topology_settings import settings_for
from tests.support import redis_servers
from tests.support.gateways import eventually

pytestmark = pytest.mark.redis  # real Redis processes (CI: the PostgreSQL phase)

NOW, TTL = 1000.0, 30
RPM = "sluice:{u1}:rpm"


@pytest.fixture
def sentinel_group():
    """A group of this test's own: it is failed over."""
    require_redis_binaries()
    with redis_servers.running(redis_servers.SentinelGroup) as group:
        yield group


@pytest.fixture
async def sentinel_store(sentinel_group):
    with redis_settings(sentinel_group.url, sentinels=sentinel_group.sentinels):
        store = RedisStore()
        yield store
        await store.aclose()


async def hits(store, count):
    """`count` requests counted at once (each opens or reuses a pooled connection)."""
    results = await asyncio.gather(*(store.hit(RPM, 10**6, 60, NOW) for _ in range(count)))
    assert all(r.allowed for r in results)
    return count


async def until_failed_over(store, group, deadline_seconds=20):
    """Requests one after another while the sentinel fails over: (served, refused), each refused one promptly."""
    served = refused = 0
    deadline = time.monotonic() + deadline_seconds
    while not group.failed_over():
        assert time.monotonic() < deadline, "no failover within the deadline:\n" + group.sentinel.tail()
        started = time.monotonic()
        try:
            await store.hit(RPM, 10**6, 60, NOW)
            served += 1
        except StoreUnavailable:
            refused += 1
        assert time.monotonic() - started < 3.0  # one connection attempt (socket_connect_timeout: 2 s), no retries
        await asyncio.sleep(0.02)  # the polling interval
    return served, refused


async def test_a_failover_loses_nothing_the_replica_had_and_applies_nothing_twice(sentinel_group, sentinel_store,
                                                                                 monkeypatch):
    store, group = sentinel_store, sentinel_group
    # Django's cache and the channel layer as config/settings.py makes them of REDIS_URL and REDIS_SENTINELS.
    values = settings_for(monkeypatch, REDIS_URL=group.url, REDIS_SENTINELS=group.sentinels_setting)
    layer = RedisChannelLayer(**values["CHANNEL_LAYERS"]["default"]["CONFIG"])
    with override_settings(CACHES=values["CACHES"]):
        from django.core.cache import cache

        day = WindowSpec("sluice:{u1}:d:test", 1000, time.time() + 3600)
        await store.seed(day, 0, {}, NOW, TTL)
        assert (await store.lease([day], "r1", 0, 100, NOW, TTL)).granted == 100
        await store.settle([day], "r1", 40)
        assert (await store.lease([day], "r2", 0, 50, NOW, TTL)).granted == 50
        counted = await hits(store, 30)
        cache.set("kept", 7)
        assert await round_trip(layer, "before")
        pooled = len(redis_servers.ask(group.master.port, lambda client: client.client_list())) - 1
        assert pooled >= 5, f"only {pooled} pooled connections to the master"
        eventually(group.replicating, timeout=10)  # the replica has every write: none may be lost

        group.master.kill()
        served, refused = await until_failed_over(store, group)
        assert refused >= 1  # there was no master for a while (down-after-milliseconds at least)
        # Once the sentinel names the new master: every operation works, at once and concurrently.
        counted += served + await hits(store, 40)
        assert (await store.lease([day], "r3", 0, 10, NOW, TTL)).granted == 10
        await store.settle([day], "r2", 50)
        await store.settle([day], "r3", 10)
        assert await store.usage(day.key, NOW) == (100, 0)
        new_master = redis_servers.quick_client(group.replica.port)
        try:
            # Each request that was served is counted once; none that was refused is.
            assert new_master.zcard(RPM) == counted
        finally:
            new_master.close()

        # The cache and the channel layer have their own pools (and retries): they get there too.
        eventually(lambda: answers(lambda: cache.get("kept")) == 7, timeout=10)
        deadline = time.monotonic() + 10
        while not await answers_async(round_trip(layer, "after")):
            assert time.monotonic() < deadline, "the channel layer did not reach the new master"
        await layer.flush()


async def test_after_a_sentinel_failover_the_store_leaves_the_living_old_master_within_a_second(sentinel_group,
                                                                                              sentinel_store):
    """SENTINEL FAILOVER: the old master lives on, and its connections with it (only new connections ask the
    sentinels). Whatever the store wrote there after the failover would be lost when the sentinel makes it a replica
    (8 s later at the earliest): the store moves to the new master within a second (sentinel.MasterFollower), and
    fails no request doing so."""
    store, group = sentinel_store, sentinel_group
    await hits(store, 20)  # 20 pooled connections to the master
    old, new = (redis_servers.quick_client(node.port) for node in (group.master, group.replica))
    try:
        failover = redis_servers.ask(group.sentinel.port, lambda c: c.sentinel_failover(redis_servers.MASTER_NAME))
        assert failover, "the sentinel refused SENTINEL FAILOVER"
        eventually(group.failed_over, timeout=20)
        failed_over_at = time.monotonic()
        while True:  # batches until one lands wholly on the new master
            on_old = old.zcard(RPM)
            await hits(store, 10)
            if old.zcard(RPM) == on_old:
                break
            assert time.monotonic() - failed_over_at < 1.0 + 1.0, "still writing to the old master"
            await asyncio.sleep(0.05)  # the polling interval
        for _ in range(3):  # and every one after it
            on_old, on_new = old.zcard(RPM), new.zcard(RPM)
            await hits(store, 20)
            assert (old.zcard(RPM), new.zcard(RPM)) == (on_old, on_new + 20)
    finally:
        old.close()
        new.close()


def answers(call):
    """`call()`, or None while the store cannot be reached."""
    from redis.exceptions import RedisError

    try:
        return call()
    except (RedisError, OSError):
        return None


async def answers_async(awaitable):
    from redis.exceptions import RedisError

    try:
        return await awaitable
    except (RedisError, OSError):
        await asyncio.sleep(0.05)  # the polling interval
        return None


async def round_trip(layer, text):
    """A message through the layer to a channel of this process and back."""
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "test.message", "text": text})
    return (await asyncio.wait_for(layer.receive(channel), 5))["text"] == text
