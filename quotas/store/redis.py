"""The Redis store: counters shared by every worker, each operation one Lua script.

Connection settings come from django-redis's cache configuration (CACHES["default"]["LOCATION"]
and OPTIONS["CONNECTION_POOL_KWARGS"]); django-redis itself has no asyncio client, so this store
opens a `redis.asyncio` pool with the same settings, one per event loop.

After Redis restarts, no request may fail on a connection the old server closed (issue 14), and no script may run
twice for one operation. So a stale connection is replaced *before* a command is written to it, and no command is
ever sent again: see `RedisStore.__init__`, and docs/quotas.md, "Failure modes".

Three topologies (settings REDIS_URL, REDIS_CLUSTER, REDIS_SENTINELS; docs/quotas.md, "When one Redis is not enough"):

- A single Redis: `redis.asyncio.Redis`.
- Sentinel (REDIS_SENTINELS; REDIS_URL's host names the master group): `Sentinel.master_for`, a pool whose every new
  connection asks the sentinels where the master is. The scripts are the same, one per operation. A master that dies
  closes its connections, and the pool's stale check replaces them as after a restart: requests during the failover
  get StoreUnavailable, the first one after it works. A master that lives on (SENTINEL FAILOVER) keeps its
  connections: `sentinel.MasterFollower` moves them to the new master within a second.
- Redis Cluster (REDIS_CLUSTER=1; REDIS_URL names any node): `redis.asyncio.cluster.RedisCluster`, which sends each
  script to the node that owns its keys' slot (following MOVED/ASK redirections, which are refusals: nothing ran).
  A script's keys must share one slot. Single-key operations always do; a lease, renewal or settlement covers a
  user's windows (`{u<id>}`) and, for a key that spends from a team's pool, the team's (`{t<id>}`): in cluster mode
  those run the same script once per slot's group of keys (`cluster.lease_by_slot`: the user's group first, each
  next group asked at most what the previous granted, an earlier group shrunk to the final grant), so each window
  is still checked atomically and none is ever exceeded. Only in cluster mode: elsewhere nothing changes (one
  script, one round trip per operation). Its retries are off as well: a command that failed on a connection error
  is not resent (the cluster client re-reads the slot map before the next one).
"""

import asyncio
import logging

from django.conf import settings
from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ClusterCrossSlotError, MovedError, RedisClusterException, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from .base import CounterStore, LeaseResult, RateResult, SlotResult, StoreUnavailable, per_window
from .base import PROBE_RETRY_SECONDS, PermitResult, UpstreamState
from .cluster import lease_by_slot, slot_groups
from .sentinel import MasterFollower

logger = logging.getLogger("quotas")

# What a failed command raises: redis-py's errors, the cluster client's own (not a RedisError: no node could be
# reached to read the slot map, a slot not covered), and the socket's.
ERRORS = (RedisError, RedisClusterException, OSError)

# KEYS[1]=zset; ARGV: limit, window, now, member
RATE = """
local limit, window, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
local allowed = 0
if n < limit and ARGV[5] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  n = n + 1
  allowed = 1
elseif n < limit then
  allowed = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = 0
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {allowed, limit - n, tostring(reset)}
"""

# KEYS[1]=hash holder->expires; ARGV: holder, limit, ttl, now
SLOT = """
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
local n = redis.call('HLEN', KEYS[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or n < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
  return {1, redis.call('HLEN', KEYS[1])}
end
return {0, n}
"""

# Window hashes: field "used", and one field per lease holder, "h:<holder>" = "units:expires" (a token window's unit
# is a token; a money window's, a nano: quotas/domain/money.py).
# KEYS = windows; ARGV: holder, (unused), want (tokens), now, ttl, then per window: limit, expire_at, rate (units per
# token of this lease), held (the holder's units in this window).
LEASE = """
local holder, want = 'h:' .. ARGV[1], tonumber(ARGV[3])
local now, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then table.insert(missing, key) end
end
if #missing > 0 then return {0, missing, {}} end
local available = {}
local granted = want
for i, key in ipairs(KEYS) do
  local base = 2 + 4 * i
  local limit, rate, held = tonumber(ARGV[base]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local used, others = 0, 0
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local field, value = all[j], all[j + 1]
    if field == 'used' then
      used = tonumber(value)
    elseif string.sub(field, 1, 2) == 'h:' then
      local sep = string.find(value, ':')
      local units, expires = tonumber(string.sub(value, 1, sep - 1)), tonumber(string.sub(value, sep + 1))
      if expires <= now then
        redis.call('HDEL', key, field)
      elseif field ~= holder then
        others = others + units
      end
    end
  end
  available[i] = limit - used - others - held
  local room = math.floor(available[i] / rate)
  if room < granted then granted = room end
end
if granted < 0 then granted = 0 end
local remaining = {}
for i, key in ipairs(KEYS) do
  local base = 2 + 4 * i
  local rate, held = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  -- %d: concatenating a number formats it with 14 significant digits, and a money window's nanos may have more.
  redis.call('HSET', key, holder, string.format('%d', held + granted * rate) .. ':' .. (now + ttl))
  local expire_at = tonumber(ARGV[base + 1])
  if redis.call('PEXPIRETIME', key) < expire_at * 1000 then
    redis.call('PEXPIREAT', key, math.ceil(expire_at * 1000))
  end
  remaining[i] = math.max(0, available[i] - granted * rate)
end
return {granted, {}, remaining}
"""

# KEYS = windows, then the slot hash (or none); ARGV: holder, now, ttl
RENEW = """
local holder, expires = ARGV[1], tonumber(ARGV[2]) + tonumber(ARGV[3])
local n, held = #KEYS, 1
if ARGV[4] == '1' then n = n - 1 end
for i = 1, n do
  local value = redis.call('HGET', KEYS[i], 'h:' .. holder)
  if value then
    local sep = string.find(value, ':')
    redis.call('HSET', KEYS[i], 'h:' .. holder, string.sub(value, 1, sep - 1) .. ':' .. expires)
  else
    held = 0
  end
end
if ARGV[4] == '1' and redis.call('HEXISTS', KEYS[#KEYS], holder) == 1 then
  redis.call('HSET', KEYS[#KEYS], holder, expires)
  redis.call('PEXPIRE', KEYS[#KEYS], math.ceil(tonumber(ARGV[3]) * 1000))
end
return held
"""

# KEYS = windows; ARGV: holder, then the units charged per window
SETTLE = """
for i, key in ipairs(KEYS) do
  if redis.call('HDEL', key, 'h:' .. ARGV[1]) == 1 then
    redis.call('HINCRBY', key, 'used', ARGV[1 + i])
  end
end
return 1
"""

# KEYS[1] = window; ARGV: used, expire_at, ttl, now, then holder/tokens pairs
SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'used', ARGV[1])
local expires = tonumber(ARGV[4]) + tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'h:' .. ARGV[i], ARGV[i + 1] .. ':' .. expires)
end
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
"""

USAGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local now, used, leased = tonumber(ARGV[1]), 0, 0
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  if all[j] == 'used' then
    used = tonumber(all[j + 1])
  else
    local sep = string.find(all[j + 1], ':')
    if tonumber(string.sub(all[j + 1], sep + 1)) > now then
      leased = leased + tonumber(string.sub(all[j + 1], 1, sep - 1))
    end
  end
end
return {used, leased}
"""


def connection_settings():
    cache = settings.CACHES.get("default", {})
    location = cache.get("LOCATION") if "redis" in cache.get("BACKEND", "") else None
    location = location or settings.REDIS_URL
    if isinstance(location, (list, tuple)):
        location = location[0]
    kwargs = dict(cache.get("OPTIONS", {}).get("CONNECTION_POOL_KWARGS", {}))
    return location, kwargs


def topology() -> str:
    """"cluster" (REDIS_CLUSTER), "sentinel" (REDIS_SENTINELS) or "single"; config/settings.py refuses both at once."""
    if getattr(settings, "REDIS_CLUSTER", False):
        return "cluster"
    return "sentinel" if getattr(settings, "REDIS_SENTINELS", None) else "single"


def cluster_client(location, kwargs) -> RedisCluster:
    """Any node of the cluster is enough to start: the client reads the slot map from it and finds the others."""
    # A node's pool grows as needed, as a single Redis's does (RedisCluster refuses a command past 100 connections to
    # one node, where the single pool would open one more).
    kwargs.setdefault("max_connections", 2**31)
    # A MOVED reply (the slot is now another node's) updates that slot's entry, and the command follows it. redis-py's
    # default (5) also closes every connection to every node at each fifth MOVED, failing the commands in flight on
    # them, whose scripts may have run (see _initialize for what that did): not here.
    kwargs.setdefault("reinitialize_steps", 0)
    return RedisCluster.from_url(location, **kwargs)


def sentinel_client(location, kwargs) -> tuple[aioredis.Redis, Sentinel]:
    """The master of the group REDIS_URL's host names (redis://mymaster/0, django-redis's convention; its database,
    user and password are the master's), found through REDIS_SENTINELS at every new connection."""
    params = parse_url(location)
    service = params.pop("host")
    params.pop("port", None)
    if params.pop("connection_class", None) is SSLConnection:
        params["ssl"] = True
    # The sentinels are asked with the same timeouts, and without retries either (a sentinel that does not answer is
    # skipped for the next one; the store must not wait for it several times per connection).
    asked = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    sentinel = Sentinel(settings.REDIS_SENTINELS, sentinel_kwargs={**asked, "retry": Retry(NoBackoff(), 0)})
    return sentinel.master_for(service, **{**kwargs, **params}), sentinel  # the URL's wins, as in from_url


class RedisStore(CounterStore):
    per_event_loop = True

    def __init__(self):
        location, kwargs = connection_settings()
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        # Stale connections. When Redis goes away, each idle pooled connection receives the server's FIN and its
        # stream reader records the end of file. The pool checks for that before it hands a connection out
        # (ConnectionPool.get_connection → ensure_connection: data or EOF on an idle connection → disconnect and
        # connect again), so the command goes out on a fresh connection, once, and nothing has to be retried.
        # redis-py 8.1.0 skips that check whenever maintenance notifications are enabled — and with RESP3 (8.x's
        # default) over TCP they are enabled by default ("auto"), even on a server that does not support them —
        # so each stale connection was handed out, the script written into the dead socket, and the reply read
        # as "Connection closed by server": one 503 per pooled connection after every restart (redis/redis-py
        # #4252, fixed upstream by #4260). Maintenance notifications only serve Redis Enterprise/Cloud's planned
        # failovers; an operator who needs them can set `maint_notifications_config` in CONNECTION_POOL_KWARGS
        # (on 8.1.0 that brings the stale-connection failures back).
        kwargs.setdefault("maint_notifications_config", MaintNotificationsConfig(enabled=False))
        # No retries, whatever CONNECTION_POOL_KWARGS says (`retry_on_error`/`retry_on_timeout` only add error
        # types to this policy, which allows none). redis-py's retry sends the command again after *any* connection
        # error or timeout, including one raised while reading the reply: the script may have run and only its
        # reply been lost. Most scripts would survive that (leases, slots and renewals write absolute values per
        # holder; `settle` charges only a window that still holds the holder's lease), but not all: a replayed
        # `hit` finds its own first attempt in the window (a request counted, then refused at the limit), and a
        # replayed `release_permit` applies the adaptive limit's step and the breaker's failure count twice.
        # So a connection error surfaces as StoreUnavailable at once and the fail-open/closed settings decide.
        # Connecting is not retried either, so a store that is down is reported within one connection attempt
        # (refused: at once; unreachable: socket_connect_timeout).
        kwargs["retry"] = Retry(NoBackoff(), 0)
        self.topology = topology()
        self.cluster = self.topology == "cluster"
        self._sentinel = self._follower = None
        self._initializing = asyncio.Lock()  # see _initialize
        if self.cluster:
            self.client = cluster_client(location, kwargs)
        elif self.topology == "sentinel":
            self.client, self._sentinel = sentinel_client(location, kwargs)
            self._follower = MasterFollower(self.client.connection_pool, ERRORS)
        else:
            self.client = aioredis.Redis.from_url(location, **kwargs)
        self._rate = self.client.register_script(RATE)
        self._slot = self.client.register_script(SLOT)
        self._lease = self.client.register_script(LEASE)
        self._renew = self.client.register_script(RENEW)
        self._settle = self.client.register_script(SETTLE)
        self._seed = self.client.register_script(SEED)
        self._usage = self.client.register_script(USAGE)
        self._member = 0

    async def aclose(self):
        """Close every connection (the tests' stores; a server's live as long as their event loop)."""
        if self._follower is not None:
            await self._follower.aclose()
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    def _unavailable(self, exc) -> StoreUnavailable:
        if not self.cluster and isinstance(exc, (MovedError, ClusterCrossSlotError)):
            # A plain client on a cluster node: scripts on other nodes' keys (MOVED) and leases over a user's and a
            # team's windows (CROSSSLOT) fail. Said at each failure: it is a configuration error, fixed at once.
            logger.error("REDIS_URL names a node of a Redis Cluster: set REDIS_CLUSTER=1 (docs/quotas.md, \"When one "
                         "Redis is not enough\")")
        return StoreUnavailable(type(exc).__name__)

    async def _run(self, command):
        """Await `command()`, the store's round trip: StoreUnavailable if it fails (never sent again)."""
        if self._follower is not None:
            self._follower.poke()
        try:
            if self.cluster and self.client.get_default_node() is None:
                await self._initialize()
            return await command()
        except ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def _initialize(self):
        """The cluster client reads the slot map before a command, once for all the commands waiting: before its
        first command, and after it dropped the map (CLUSTERDOWN while a node fails over). redis-py 8.1 sends the
        commands that come meanwhile to any node, which answers MOVED, and with its default `reinitialize_steps` the
        fifth MOVED closed every connection under the others: of 20 concurrent first requests on each of 20 fresh
        stores, 116 failed (89 ConnectionError, 27 a TypeError in redis-py). With either this or
        `reinitialize_steps=0` (cluster_client): none."""
        async with self._initializing:
            if self.client.get_default_node() is None:
                await self.client.initialize()

    async def _call(self, script, keys, args):
        return await self._run(lambda: script(keys=keys, args=args))

    async def hit(self, key, limit, window_seconds, now):
        return await self._rate_call(key, limit, window_seconds, now, count=True)

    async def peek_rate(self, key, limit, window_seconds, now):
        return await self._rate_call(key, limit, window_seconds, now, count=False)

    async def _rate_call(self, key, limit, window_seconds, now, count):
        self._member += 1
        member = f"{now}:{id(self)}:{self._member}"
        allowed, remaining, reset = await self._call(
            self._rate, [key], [limit, window_seconds, repr(now), member, "1" if count else "0"])
        return RateResult(bool(allowed), max(0, int(remaining)), max(0.0, float(reset)),
                          member if count and allowed else None)

    async def unhit(self, key, member):
        await self._run(lambda: self.client.zrem(key, member))

    async def acquire_slot(self, key, holder, limit, ttl, now):
        acquired, active = await self._call(self._slot, [key], [holder, limit, ttl, repr(now)])
        return SlotResult(bool(acquired), int(active))

    async def release_slot(self, key, holder):
        await self._run(lambda: self.client.hdel(key, holder))

    async def lease(self, windows, holder, held, want, now, ttl):
        held = per_window(held, windows)
        if not self.cluster:
            return await self._lease_windows(windows, holder, held, want, now, ttl)

        async def run(group, group_held, group_want):
            return await self._lease_windows([windows[i] for i in group], holder, group_held, group_want, now, ttl)

        return await lease_by_slot(run, windows, held, want)

    async def _lease_windows(self, windows, holder, held, want, now, ttl):
        """One LEASE script over `windows` (one slot's, in cluster mode), `held` one amount per window."""
        args = [holder, 0, want, repr(now), ttl]
        for window, mine in zip(windows, held):
            args += [window.limit, repr(window.expire_at), window.rate, mine]
        granted, missing, remaining = await self._call(self._lease, [w.key for w in windows], args)
        return LeaseResult(int(granted), tuple(m.decode() if isinstance(m, bytes) else m for m in missing),
                           tuple(int(r) for r in remaining))

    def _by_slot(self, keys):
        """The indices of `keys` in one group (one script), or per slot in cluster mode."""
        return slot_groups(keys) if self.cluster else [list(range(len(keys)))]

    async def renew(self, windows, slot_key, holder, now, ttl):
        keys = [w.key for w in windows] + ([slot_key] if slot_key else [])
        held = True
        for group in self._by_slot(keys):
            # The slot hash is the last key, and so the last of its group: the script renews it when told so.
            with_slot = bool(slot_key) and group[-1] == len(keys) - 1
            held &= bool(await self._call(self._renew, [keys[i] for i in group],
                                          [holder, repr(now), ttl, "1" if with_slot else "0"]))
        return held

    async def settle(self, windows, holder, charged):
        # Per group in cluster mode, each group atomic: a settlement sent again after a failure half-way charges only
        # the windows that still hold the lease (the others dropped it as they charged).
        keys, charged = [w.key for w in windows], per_window(charged, windows)
        for group in self._by_slot(keys):
            await self._call(self._settle, [keys[i] for i in group], [holder, *(charged[i] for i in group)])

    async def seed(self, window, used, leases, now, ttl):
        args = [used, repr(window.expire_at), ttl, repr(now)]
        for holder, tokens in leases.items():
            args += [holder, tokens]
        await self._call(self._seed, [window.key], args)

    async def usage(self, key, now):
        result = await self._call(self._usage, [key], [repr(now)])
        return None if result is None else (int(result[0]), int(result[1]))

    async def delete(self, key):
        await self._run(lambda: self.client.delete(key))

    # The shared upstream limit and circuit breaker (see the contract in base.py) ----------------------------

    def _script(self, source):
        # Registered on first use: the permit scripts were added after __init__'s.
        scripts = self.__dict__.setdefault("_upstream_scripts", {})
        if source not in scripts:
            scripts[source] = self.client.register_script(source)
        return scripts[source]

    async def acquire_permit(self, key, holder, policy, now, user="", waiting=()):
        status, limit, active, retry_after, probe, over_share, own = await self._call(
            self._script(ACQUIRE_PERMIT), [key], [
                holder, repr(now), policy.ttl_seconds, policy.min_limit, policy.max_limit, policy.state_seconds,
                PROBE_RETRY_SECONDS, str(user), "1" if policy.fair_share else "0", repr(float(policy.demand_seconds)),
                *(str(other) for other in waiting)])
        return PermitResult(status.decode() if isinstance(status, bytes) else status, float(limit), int(active),
                            float(retry_after), bool(probe), bool(over_share), bool(own))

    async def release_permit(self, key, holder, outcome, limit_seen, policy, now, keep=False, user=""):
        limit = await self._call(self._script(RELEASE_PERMIT), [key], [
            holder, outcome, repr(float(limit_seen)), repr(now), policy.min_limit, policy.max_limit,
            repr(float(policy.increase)), repr(float(policy.decrease_factor)), policy.breaker_threshold,
            repr(float(policy.breaker_cooldown_seconds)), "1" if keep else "0", policy.state_seconds, str(user),
            "1" if policy.fair_share else "0", repr(float(policy.demand_seconds)), policy.user_failures_counted])
        return float(limit)

    async def renew_permit(self, key, holder, ttl, now):
        return bool(await self._call(self._script(RENEW_PERMIT), [key], [holder, repr(now), ttl]))

    async def permit_excess(self, key, policy, now):
        if not policy.fair_share or not policy.max_limit:
            return {}
        flat = await self._call(self._script(PERMIT_EXCESS), [key], [repr(now), policy.min_limit, policy.max_limit])
        users = [u.decode() if isinstance(u, bytes) else u for u in flat[::2]]
        return dict(zip(users, (int(n) for n in flat[1::2])))

    async def upstream_states(self, keys, now):
        # One round trip (one per node on a cluster); each record is small (its permits and the users contending).
        records = await self._run(lambda: self._read_hashes(keys))
        states = {}
        for key, record in zip(keys, records):
            if not record:
                continue
            fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                      for k, v in record.items()}
            permits = sum(1 for field, value in fields.items()
                          if field.startswith("p:") and float(value.partition("|")[0]) > now)
            limit = fields.get("limit")
            states[key] = UpstreamState(float(limit) if limit else None, float(fields.get("open_until") or 0),
                                        permits)
        return states

    async def _read_hashes(self, keys):
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return await pipe.execute()


# The upstream record, one hash per upstream: "limit" (float), "fails" (counted in the current run), "run" (the
# run's number), "open_until" (0 or absent: closed), "probe" ("holder|expires" while half-open), one
# "p:<holder>" = "expires|user" per permit, and per user: "u:<user>" = "until|demand|wait_until" (contending until;
# the most it held at once meanwhile; waiting until), "b:<user>" = "failures|open_until" (its own breaker),
# "r:<user>" = "run|failures" (its failures in the current run).

# Splits "a|b" into a, b (b nil without a '|'). Shared by the scripts below.
SPLIT = """
local function split(value)
  local sep = string.find(value, '|', 1, true)
  if not sep then return value, nil end
  return string.sub(value, 1, sep - 1), string.sub(value, sep + 1)
end
"""

# KEYS[1] = upstream; ARGV: holder, now, ttl, min, max, state_seconds, probe_retry, user, fair (1/0), demand_seconds,
# then the users waiting in the caller's process
ACQUIRE_PERMIT = SPLIT + """
local key, holder, user = KEYS[1], ARGV[1], ARGV[8]
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local min_l, max_l = tonumber(ARGV[4]), tonumber(ARGV[5])
local fair, demand_s = ARGV[9] == '1', tonumber(ARGV[10])
local own = redis.call('HGET', key, 'b:' .. user)
if own then
  local _, own_until = split(own)
  own_until = tonumber(own_until or '0')
  if own_until > now then return {'open', '0', 0, tostring(own_until - now), 0, 0, 1} end
end
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
local probe = 0
if open_until > 0 then
  if now < open_until then return {'open', '0', 0, tostring(open_until - now), 0, 0, 0} end
  local running = redis.call('HGET', key, 'probe')
  if running then
    local running_holder, running_until = split(running)
    if running_holder ~= holder and tonumber(running_until) > now then
      return {'open', '0', 0, ARGV[7], 0, 0, 0}
    end
  end
  probe = 1
end
local limit = tonumber(redis.call('HGET', key, 'limit') or ARGV[5])
if max_l > 0 then limit = math.max(min_l, math.min(max_l, limit)) end
local mine = 'p:' .. holder
local permit = tostring(now + ttl) .. '|' .. user
local function granted(active)
  redis.call('HSET', key, mine, permit)
  if probe == 1 then redis.call('HSET', key, 'probe', holder .. '|' .. tostring(now + ttl)) end
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[6]) * 1000))
  return {'acquired', tostring(limit), active, '0', probe, 0, 0}
end
-- With no limit nothing needs counting: skip the scan (it would cost O(streams) per request).
if max_l == 0 then return granted(1) end
local run = redis.call('HGET', key, 'run') or '0'
local held_by, users = {}, {}
local held, others = false, 0
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local kind = string.sub(field, 1, 2)
  if kind == 'p:' then
    local expires, owner = split(value)
    if tonumber(expires) <= now then
      redis.call('HDEL', key, field)
    else
      owner = owner or ''
      held_by[owner] = (held_by[owner] or 0) + 1
      if field == mine then held = true else others = others + 1 end
    end
  elseif kind == 'u:' then
    local until_, rest = split(value)
    if tonumber(until_) <= now then
      redis.call('HDEL', key, field)
    else
      local demand, wait_until = split(rest)
      users[string.sub(field, 3)] = {tonumber(demand), tonumber(wait_until)}
    end
  elseif kind == 'r:' and split(value) ~= run then
    redis.call('HDEL', key, field)
  end
end
-- A user contends for demand_s more; `waiting`: true or false sets whether it waits, nil keeps it.
local function contend(who, demand, waiting)
  local entry = users[who] or {0, 0}
  local wait_until = entry[2]
  if waiting == true then wait_until = now + demand_s elseif waiting == false then wait_until = 0 end
  entry = {math.max(entry[1], demand), wait_until}
  users[who] = entry
  redis.call('HSET', key, 'u:' .. who, tostring(now + demand_s) .. '|' .. entry[1] .. '|' .. tostring(wait_until))
end
if fair then
  for i = 11, #ARGV do contend(ARGV[i], 0, true) end
end
local capacity = math.floor(limit)
if not held then
  local over = 0
  if fair and others < capacity then
    local contending, n = {}, 0
    for who, _ in pairs(held_by) do contending[who] = true end
    for who, _ in pairs(users) do contending[who] = true end
    contending[user] = true
    for _, _ in pairs(contending) do n = n + 1 end
    local share = math.max(1, math.floor(capacity / n))
    if (held_by[user] or 0) >= share then
      -- What the other contenders lack of their shares: a waiting user its whole share, another up to its demand.
      local lacking = 0
      for who, _ in pairs(contending) do
        if who ~= user then
          local wants, entry = 0, users[who]
          if entry then
            if entry[2] > now then wants = share else wants = math.min(share, entry[1]) end
          end
          wants = wants - (held_by[who] or 0)
          if wants > 0 then lacking = lacking + wants end
        end
      end
      if capacity - others <= lacking then over = 1 end
    end
  end
  if others >= capacity or over == 1 then
    if fair then contend(user, (held_by[user] or 0) + 1, true) end
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[6]) * 1000))
    return {'full', tostring(limit), others, '0', 0, over, 0}
  end
  held_by[user] = (held_by[user] or 0) + 1
end
if fair then contend(user, held_by[user], false) end
return granted(others + 1)
"""

# KEYS[1] = upstream; ARGV: holder, outcome, limit_seen, now, min, max, increase, decrease_factor,
# breaker_threshold, breaker_cooldown, keep, state_seconds, user, fair (1/0), demand_seconds, failures counted per user
RELEASE_PERMIT = SPLIT + """
local key, holder, outcome, user = KEYS[1], ARGV[1], ARGV[2], ARGV[13]
local now, min_l, max_l = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local threshold, cooldown = tonumber(ARGV[9]), tonumber(ARGV[10])
if ARGV[11] ~= '1' then redis.call('HDEL', key, 'p:' .. holder) end
local limit = tonumber(redis.call('HGET', key, 'limit') or ARGV[6])
if max_l > 0 then
  if outcome == 'ok' then
    limit = math.min(max_l, limit + tonumber(ARGV[7]) / math.max(limit, 1))
  elseif outcome == 'throttled' then
    limit = math.max(min_l, math.min(limit, tonumber(ARGV[3]) * tonumber(ARGV[8])))
  end
  redis.call('HSET', key, 'limit', tostring(limit))
  if ARGV[14] == '1' then
    -- The user contends a while longer, its demand and wait kept while they last.
    local entry = redis.call('HGET', key, 'u:' .. user)
    local rest = '0|0'
    if entry then
      local until_, kept = split(entry)
      if tonumber(until_) > now then rest = kept end
    end
    redis.call('HSET', key, 'u:' .. user, tostring(now + tonumber(ARGV[15])) .. '|' .. rest)
  end
end
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
if open_until > 0 then
  local running = redis.call('HGET', key, 'probe')
  if running and split(running) == holder and now >= open_until then
    redis.call('HDEL', key, 'probe')
    if outcome == 'ok' or outcome == 'throttled' then
      redis.call('HDEL', key, 'open_until', 'b:' .. user)
      redis.call('HSET', key, 'fails', 0)
    elseif outcome == 'failed' then
      redis.call('HSET', key, 'open_until', tostring(now + cooldown))
    end
  end
elseif outcome == 'ok' or outcome == 'throttled' then
  if tonumber(redis.call('HGET', key, 'fails') or '0') > 0 then
    redis.call('HSET', key, 'fails', 0)
    redis.call('HINCRBY', key, 'run', 1)  -- a new run: every user's failures in it start from 0
  end
  redis.call('HDEL', key, 'b:' .. user)
elseif outcome == 'failed' and threshold > 0 then
  if tonumber(ARGV[16]) < threshold then
    -- The user's own breaker (one user cannot open the shared one); after its cooldown one failure reopens it.
    local fails, own_until = 0, '0'
    local own = redis.call('HGET', key, 'b:' .. user)
    if own then
      local counted_fails, counted_until = split(own)
      fails, own_until = tonumber(counted_fails), counted_until or '0'
    end
    fails = fails + 1
    if fails >= threshold then fails, own_until = threshold - 1, tostring(now + cooldown) end
    redis.call('HSET', key, 'b:' .. user, fails .. '|' .. own_until)
  end
  -- The shared run: at most ARGV[16] of one user's failures in it count.
  local run = redis.call('HGET', key, 'run') or '0'
  local counted = 1
  local mine = redis.call('HGET', key, 'r:' .. user)
  if mine then
    local mine_run, mine_counted = split(mine)
    if mine_run == run then counted = tonumber(mine_counted) + 1 end
  end
  redis.call('HSET', key, 'r:' .. user, run .. '|' .. counted)
  if counted <= tonumber(ARGV[16]) and redis.call('HINCRBY', key, 'fails', 1) >= threshold then
    redis.call('HSET', key, 'open_until', tostring(now + cooldown), 'fails', 0)
    redis.call('HINCRBY', key, 'run', 1)
  end
end
redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[12]) * 1000))
return tostring(limit)
"""

# KEYS[1] = upstream; ARGV: holder, now, ttl
RENEW_PERMIT = SPLIT + """
local mine = 'p:' .. ARGV[1]
local value = redis.call('HGET', KEYS[1], mine)
if not value then return 0 end
local _, owner = split(value)
local expires = tostring(tonumber(ARGV[2]) + tonumber(ARGV[3]))
if owner then
  redis.call('HSET', KEYS[1], mine, expires .. '|' .. owner)
else
  redis.call('HSET', KEYS[1], mine, expires)
end
local running = redis.call('HGET', KEYS[1], 'probe')
if running and split(running) == ARGV[1] then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1] .. '|' .. expires)
end
return 1
"""

# KEYS[1] = upstream; ARGV: now, min, max. Reads only: {user, permits over its share, ...}.
PERMIT_EXCESS = SPLIT + """
local key, now = KEYS[1], tonumber(ARGV[1])
local limit = tonumber(redis.call('HGET', key, 'limit') or ARGV[3])
limit = math.max(tonumber(ARGV[2]), math.min(tonumber(ARGV[3]), limit))
local held_by, contending, waiting = {}, {}, {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local kind = string.sub(field, 1, 2)
  if kind == 'p:' then
    local expires, owner = split(value)
    if tonumber(expires) > now then
      owner = owner or ''
      held_by[owner] = (held_by[owner] or 0) + 1
      contending[owner] = true
    end
  elseif kind == 'u:' then
    local until_, rest = split(value)
    if tonumber(until_) > now then
      local who = string.sub(field, 3)
      contending[who] = true
      local _, wait_until = split(rest)
      if tonumber(wait_until) > now then waiting[who] = true end
    end
  end
end
local n = 0
for _, _ in pairs(contending) do n = n + 1 end
local share = math.max(1, math.floor(math.floor(limit) / math.max(1, n)))
local excess = {}
for who, held in pairs(held_by) do
  if held > share then
    for other, _ in pairs(waiting) do
      if other ~= who and (held_by[other] or 0) < share then
        table.insert(excess, who)
        table.insert(excess, held - share)
        break
      end
    end
  end
end
return excess
"""
