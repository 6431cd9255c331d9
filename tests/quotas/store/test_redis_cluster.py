"""The counter store on a Redis Cluster (issue 20, item 4): three real `redis-server` nodes in cluster mode, started
once for the session (tests/support/redis_servers.py). The contract tests (test_store.py) run on it too; these check
what is particular to a cluster: a lease over a user's windows and a team's (two slots) grants, shrinks and never
overshoots; every script Sluice sends keeps its keys in one slot; outside cluster mode an operation is still one
script; a fresh store's first concurrent requests and a resharding fail none; a plain REDIS_URL at a node says what
to set; the channel layer spans the nodes; and a real gateway streams and counts on the cluster.
"""

import asyncio
import dataclasses
import datetime
import time
from collections import Counter

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot as redis_key_slot

from quotas.store import StoreUnavailable, WindowSpec
from quotas.store.cluster import key_slot, slot_groups
from quotas.store.redis import RedisStore
from tests.quotas.store.conftest import redis_settings, require_redis_binaries
from tests.support import redis_servers

pytestmark = pytest.mark.redis  # real Redis processes (CI: the PostgreSQL phase)

NOW, TTL = 1000.0, 30


def spec(key, limit, rate=1):
    return WindowSpec(key=key, limit=limit, expire_at=time.time() + 3600, rate=rate)


@pytest.fixture
async def cluster_store(redis_cluster):
    redis_cluster.flush()
    with redis_settings(redis_cluster.url, cluster=True):
        store = RedisStore()
        yield store
        await store.aclose()


@pytest.fixture
def cluster_client(redis_cluster):
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield client
    client.close()


async def seeded(store, *windows):
    for window in windows:
        await store.seed(window, 0, {}, NOW, TTL)
    return list(windows)


def test_key_slot_is_the_clusters(cluster_client):
    keys = ["sluice:{u1}:d:2026-01-31", "sluice:{t42}:m7:budget_month:2026-01", "sluice:{up:0123abcd}:upstream",
            "test:d", "{}x", "a{}{b}", "{a}{b}", "plain", "ünïcode:{ü}", "x{y", "x}{y}"]
    for key in keys:
        assert key_slot(key) == cluster_client.cluster_keyslot(key) == redis_key_slot(key.encode()), key


def test_groups_are_per_slot_in_the_order_of_their_first_key():
    keys = ["sluice:{u1}:d", "sluice:{u1}:m", "sluice:{t1}:d", "sluice:{u1}:k3:d", "sluice:{t1}:m1:d"]
    assert slot_groups(keys) == [[0, 1, 3], [2, 4]]


async def test_a_lease_over_a_users_and_a_teams_windows_grants_and_shrinks_to_the_tighter(cluster_store):
    day, pool, cap = await seeded(cluster_store, spec("sluice:{u1}:d", 1000), spec("sluice:{t1}:d", 30),
                                  spec("sluice:{t1}:m1:d", 500))
    assert key_slot(day.key) != key_slot(pool.key)
    first = await cluster_store.lease([day, pool, cap], "r1", 0, 20, NOW, TTL)
    assert (first.granted, first.missing, first.remaining) == (20, (), (980, 10, 480))
    # r1 wants 50 more: the user's window grants 50, the team's pool only 10; the user's record is shrunk to 30.
    more = await cluster_store.lease([day, pool, cap], "r1", 20, 50, NOW, TTL)
    assert (more.granted, more.remaining) == (10, (970, 0, 470))
    assert [await cluster_store.usage(w.key, NOW) for w in (day, pool, cap)] == [(0, 30), (0, 30), (0, 30)]
    # Another request of the same user gets nothing, and holds nothing anywhere.
    assert (await cluster_store.lease([day, pool, cap], "r2", 0, 5, NOW, TTL)).granted == 0
    assert await cluster_store.usage(day.key, NOW) == (0, 30)


async def test_the_shrink_records_each_windows_units_at_its_rate(cluster_store):
    """A money window in the user's slot (nanos per token) shrunk by the team's tighter token pool."""
    budget, pool = await seeded(cluster_store, spec("sluice:{u1}:budget_day", 10**9), spec("sluice:{t1}:d", 100))
    priced = [dataclasses.replace(budget, rate=4000), pool]
    result = await cluster_store.lease(priced, "r1", (8000, 2), 500, NOW, TTL)
    assert result.granted == 98
    assert await cluster_store.usage(budget.key, NOW) == (0, 8000 + 98 * 4000)
    assert await cluster_store.usage(pool.key, NOW) == (0, 100)


async def test_a_missing_window_in_any_slot_means_nothing_granted_anywhere(cluster_store):
    day, = await seeded(cluster_store, spec("sluice:{u1}:d", 1000))
    pool, cap = spec("sluice:{t1}:d", 30), spec("sluice:{u2}:d", 30)
    result = await cluster_store.lease([day, pool, cap], "r1", 0, 20, NOW, TTL)
    # Every missing window is named at once (to be seeded before the next try), in the windows' order.
    assert (result.granted, result.missing, result.remaining) == (0, (pool.key, cap.key), ())
    assert await cluster_store.usage(day.key, NOW) == (0, 0)
    await seeded(cluster_store, pool, cap)
    assert (await cluster_store.lease([day, pool, cap], "r1", 0, 20, NOW, TTL)).granted == 20


async def test_renew_and_settle_reach_every_slot(cluster_store):
    day, pool = await seeded(cluster_store, spec("sluice:{u1}:d", 1000), spec("sluice:{t1}:d", 1000))
    slots = "sluice:{u1}:slots"
    assert (await cluster_store.acquire_slot(slots, "r1", 5, TTL, NOW)).acquired
    await cluster_store.lease([day, pool], "r1", 0, 40, NOW, TTL)
    await cluster_store.renew([day, pool], slots, "r1", NOW + 20, TTL)
    # Past the first TTL, the renewed lease and slot still hold.
    assert [await cluster_store.usage(w.key, NOW + 40) for w in (day, pool)] == [(0, 40), (0, 40)]
    assert (await cluster_store.acquire_slot(slots, "r2", 1, TTL, NOW + 40)).active == 1
    await cluster_store.settle([day, pool], "r1", 25)
    await cluster_store.settle([day, pool], "r1", 25)  # again (a retry): nothing more
    assert [await cluster_store.usage(w.key, NOW) for w in (day, pool)] == [(25, 0), (25, 0)]


async def test_200_concurrent_leases_over_users_and_a_team_never_overshoot(cluster_store):
    """Four users of one team, 50 requests each, all at once, each leasing 7 tokens at a time until refused. Each
    window is checked in its own slot; the users' windows are shrunk to what the team's grant: at the end every
    window holds exactly what its requests hold, the pool is full to the token, the capped member within its cap."""
    users = range(1, 5)
    own = {u: await seeded(cluster_store, spec(f"sluice:{{u{u}}}:d", 10**6), spec(f"sluice:{{u{u}}}:m", 10**6))
           for u in users}
    pool, = await seeded(cluster_store, spec("sluice:{t1}:m", 1000))
    caps = {u: (await seeded(cluster_store, spec(f"sluice:{{t1}}:m{u}:m", 100 if u == 1 else 10**6)))[0]
            for u in users}

    async def greedy(user, holder):
        windows, held = [*own[user], pool, caps[user]], 0
        while granted := (await cluster_store.lease(windows, holder, held, 7, NOW, TTL)).granted:
            held += granted
        return user, held

    holdings = await asyncio.gather(*(greedy(u, f"r{u}-{i}") for u in users for i in range(50)))
    per_user = Counter()
    for user, held in holdings:
        per_user[user] += held
    assert sum(per_user.values()) == 1000
    assert await cluster_store.usage(pool.key, NOW) == (0, 1000)
    assert per_user[1] <= 100
    for user in users:
        assert await cluster_store.usage(caps[user].key, NOW) == (0, per_user[user])
        for window in own[user]:
            assert await cluster_store.usage(window.key, NOW) == (0, per_user[user])


async def test_a_fresh_stores_first_operations_may_all_come_at_once(redis_cluster):
    """The slot map is read once, before the first command (RedisStore._initialize): with redis-py's defaults the
    first concurrent commands of a fresh client went out without it, and some failed."""
    redis_cluster.flush()
    with redis_settings(redis_cluster.url, cluster=True):
        for attempt in range(10):  # ten fresh stores (a race: one may not show it)
            store = RedisStore()
            try:
                results = await asyncio.gather(*(store.hit(f"sluice:{{u{i}}}:rpm", 20, 60, NOW) for i in range(20)))
            finally:
                await store.aclose()
            assert all(r.allowed for r in results), attempt


async def test_a_resharding_fails_no_request(redis_cluster, cluster_store):
    """Slots moved to another node while the store has their old owner in its map: the commands for them are answered
    MOVED and follow it, the others in flight at the same time are not disturbed, and each is counted once."""
    users = range(200)
    keys = {user: f"sluice:{{u{user}}}:rpm" for user in users}
    await asyncio.gather(*(cluster_store.hit(key, 10, 60, NOW) for key in keys.values()))
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[1]
    moved = [user for user in users if redis_cluster.owner(key_slot(keys[user])) is source][:10]
    for user in moved:
        redis_cluster.move_slot(key_slot(keys[user]), target)
    results = await asyncio.gather(*(cluster_store.hit(keys[user], 10, 60, NOW) for user in users for _ in range(2)))
    assert all(r.allowed for r in results)
    # Each counted once: 1 before, then 2 (in either order).
    assert {tuple(sorted(r.remaining for r in results[i:i + 2])) for i in range(0, len(results), 2)} == {(7, 8)}


async def test_a_plain_redis_url_at_a_cluster_node_fails_and_says_to_set_redis_cluster(redis_cluster, caplog):
    redis_cluster.flush()
    elsewhere = next(key for key in (f"sluice:{{u{user}}}:rpm" for user in range(100))
                     if redis_cluster.owner(key_slot(key)) is not redis_cluster.nodes[0])
    with redis_settings(redis_cluster.url):  # REDIS_URL names node 0, REDIS_CLUSTER is not set
        store = RedisStore()
        try:
            with pytest.raises(StoreUnavailable):
                await store.hit(elsewhere, 5, 60, NOW)
        finally:
            await store.aclose()
    assert "REDIS_URL names a node of a Redis Cluster: set REDIS_CLUSTER=1" in caplog.text


class RecordingStore(RedisStore):
    """The cluster store, noting the keys of every script it sends (the scripts still run: nothing is faked)."""

    def __init__(self):
        super().__init__()
        self.sent = []

    async def _call(self, script, keys, args):
        self.sent.append(list(keys))
        return await super()._call(script, keys, args)


def a_requests_keys(user_id=7, team_id=3, key_id=11):
    """Sluice's own key functions for a priced request with a key that has a spend limit and spends from a team's pool
    with a member's cap: every window it leases, its concurrency slot, its rate, and its upstream's record."""
    from quotas.domain.admission import user_key
    from quotas.domain.windows import window_specs
    from quotas.domain.policy import Limits, Pool
    from streaming.provider.permits import store_key

    pools = (Pool("key", key_id, "sk-test", budget_per_day=10**9),
             Pool("team", team_id, "team", tokens_per_month=10**6, budget_per_month=10**12),
             Pool("member", team_id, "team", budget_per_month=10**10))
    limits = Limits(10**6, 10**7, 100, 10, 4096, (), budget_per_day=10**10, budget_per_month=10**11, pools=pools)
    _, specs = window_specs(user_id, limits, datetime.datetime.now(datetime.UTC), money=True)
    return specs, user_key(user_id, "slots"), user_key(user_id, "rpm"), store_key("https://upstream.example/v1")


async def test_every_script_sluice_sends_keeps_its_keys_in_one_slot(redis_cluster, cluster_client):
    specs, slots, rpm, upstream = a_requests_keys()
    owners = [("user" if ":{u7}:" in s.key else "team") for s in specs]
    assert owners == sorted(owners, key=["user", "team"].index) and set(owners) == {"user", "team"}, specs
    redis_cluster.flush()
    with redis_settings(redis_cluster.url, cluster=True):
        store = RecordingStore()
        try:
            lease = await store.lease(specs, "r1", 0, 10, NOW, TTL)
            for spec_ in specs:
                await store.seed(spec_, 0, {}, NOW, TTL)
            assert (await store.lease(specs, "r1", 0, 10, NOW, TTL)).granted == 10
            await store.acquire_slot(slots, "r1", 5, TTL, NOW)
            await store.hit(rpm, 100, 60, NOW)
            await store.renew(specs, slots, "r1", NOW + 10, TTL)
            await store.settle(specs, "r1", 10)
        finally:
            await store.aclose()
    assert set(lease.missing) == {s.key for s in specs}
    for keys in store.sent:
        assert len({cluster_client.cluster_keyslot(key) for key in keys}) == 1, keys
    # A lease, renewal or settlement is one script per owner: the user's (its keys' windows too) first, the team's.
    user_slot = key_slot(slots)
    lease_groups = [keys for keys in store.sent if keys[0] in {s.key for s in specs} and len(keys) > 1]
    assert {key_slot(keys[0]) for keys in lease_groups} == {user_slot, key_slot(specs[-1].key)}
    assert key_slot(rpm) == user_slot and key_slot(upstream) == cluster_client.cluster_keyslot(upstream)


class SingleRedis(redis_servers.RedisProcess):
    def __init__(self, directory):
        super().__init__(directory, "single")

    def start(self):
        super().start(*redis_servers.data_node_arguments())


@pytest.fixture
def single_redis():
    """A private single redis-server: its command statistics count only this test's commands."""
    require_redis_binaries()
    with redis_servers.running(SingleRedis) as server:
        yield server


def evalsha_calls(ports):
    stats = [redis_servers.ask(port, lambda client: client.info("commandstats")) for port in ports]
    return sum(s.get("cmdstat_evalsha", {}).get("calls", 0) for s in stats)


def reset_stats(ports):
    for port in ports:
        redis_servers.ask(port, lambda client: client.config_resetstat())


async def scripts_per_operation(store, ports):
    """EVALSHA calls of a lease that shrinks, a renewal and a settlement over a user's and a team's windows."""
    day, pool = await seeded(store, spec("sluice:{u1}:d", 1000), spec("sluice:{t1}:d", 30))
    # Every script loaded (a first EVALSHA answers NOSCRIPT) before counting.
    await store.lease([day, pool], "warm-up", 0, 0, NOW, TTL)
    await store.settle([day, pool], "warm-up", 0)
    await store.renew([day, pool], "sluice:{u1}:slots", "warm-up", NOW, TTL)
    counts = []
    for operation in (lambda: store.lease([day, pool], "r1", 0, 50, NOW, TTL),
                      lambda: store.renew([day, pool], "sluice:{u1}:slots", "r1", NOW, TTL),
                      lambda: store.settle([day, pool], "r1", 30)):
        reset_stats(ports)
        await operation()
        counts.append(evalsha_calls(ports))
    return counts


async def test_one_script_per_operation_on_a_single_redis_one_per_slot_on_a_cluster(single_redis, redis_cluster):
    with redis_settings(f"redis://{redis_servers.HOST}:{single_redis.port}/0"):
        store = RedisStore()
        try:
            assert await scripts_per_operation(store, [single_redis.port]) == [1, 1, 1]
        finally:
            await store.aclose()
    redis_cluster.flush()
    with redis_settings(redis_cluster.url, cluster=True):
        store = RedisStore()
        try:
            # The lease: the user's slot, the team's (which grants less), the user's again (the shrink).
            assert await scripts_per_operation(store, [n.port for n in redis_cluster.nodes]) == [3, 2, 2]
        finally:
            await store.aclose()


async def test_the_channel_layer_on_a_cluster_reaches_a_process_on_another_node(redis_cluster, monkeypatch):
    """channels_redis's pub/sub layer (config/settings.py's choice for a cluster): a group message published through
    one node reaches a subscriber on another (the cluster forwards PUBLISH to every node)."""
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from tests.quotas.store.test_redis_topology_settings import settings_for

    config = settings_for(monkeypatch, REDIS_URL=redis_cluster.url, REDIS_CLUSTER="1")["CHANNEL_LAYERS"]["default"]
    assert config["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    here = RedisPubSubChannelLayer(**config["CONFIG"])
    there = RedisPubSubChannelLayer(hosts=[f"redis://{redis_servers.HOST}:{redis_cluster.nodes[2].port}/0"])
    try:
        channel = await here.new_channel()
        await here.group_add("sluice.live", channel)
        received = asyncio.create_task(here.receive(channel))
        deadline = time.monotonic() + 5
        while not received.done():  # published again until the subscription is in place on every node
            assert time.monotonic() < deadline, "no message through the cluster"
            await there.group_send("sluice.live", {"type": "live.snapshot", "process": "there"})
            await asyncio.wait({received}, timeout=0.1)
        assert received.result()["process"] == "there"
    finally:
        await here.flush()
        await there.flush()


@pytest.mark.django_db(transaction=True)
def test_a_gateway_on_the_cluster_streams_and_counts_a_users_and_a_teams_tokens(redis_cluster, cluster_client,
                                                                                make_user):
    """A real gateway with REDIS_URL naming a node and REDIS_CLUSTER=1; its key spends from a team's daily pool of
    58 tokens: every lease covers the user's slot and the team's. The stream's max_tokens is clamped to the 50 the
    pool has left after the prompt's 8 (the grouped lease's `remaining`, window by window), the next stream is refused
    for the pool, and both slots count exactly what the ledger charged."""
    from tests.quotas.domain.test_budgets import run_streams
    from tests.quotas.domain.test_teams import make_team, settled_team_rows
    from tests.support.gateways import eventually, gateway_server

    redis_cluster.flush()
    team, (person,) = make_team(make_user, members=1, tokens_per_day=58)
    with gateway_server(REDIS_URL=redis_cluster.url, REDIS_CLUSTER="1") as gateway:
        gateway.control(default_tokens=500)
        assert run_streams([gateway], person.team_key, 1, 200) == [(50, "completed", "")]
        [(received, ending, message)] = run_streams([gateway], person.team_key, 1, 200)
    assert (received, ending) == (0, "insufficient_quota") and team.name in message, message
    row = settled_team_rows(team, 2).get(status="completed")
    assert (row.prompt_tokens, row.completion_tokens, row.charged_tokens) == (8, 50, 58)

    def window(tag):
        [key] = cluster_client.keys(f"sluice:{{{tag}}}:d:*", target_nodes=RedisCluster.PRIMARIES)
        return cluster_client.hgetall(key)

    # Settled in both slots: 58 used, no lease left.
    eventually(lambda: window(f"u{person.user.pk}") == {"used": "58"} and window(f"t{team.pk}") == {"used": "58"})
