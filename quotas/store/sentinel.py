"""Behind Redis Sentinel: the store's pooled connections follow the master within a second of a failover.

redis-py's SentinelConnectionPool asks the sentinels where the master is only when it opens a connection. A master
that dies closes all its connections, so they are all reopened, at the new master. But a master that is still alive
when the sentinels promote its replica (SENTINEL FAILOVER; a network partition that hides it from the sentinels
only) keeps serving the connections already open, and whatever is written there is lost when it becomes a replica:
Redis 7.0's sentinel reconfigures it some 8 s after the failover at the earliest (never while it cannot reach it).
Measured before this module: after a SENTINEL FAILOVER a store with 20 pooled connections kept writing to the old
master for more than 8 s: 755 of the 800 requests it counted in that time went there, to be lost.

So `MasterFollower` asks the sentinels at most once a second, in the background (no request waits for a sentinel,
one that does not answer included); when the master moved, the idle connections are closed and those in use are
closed as they come back, so the next commands go to the new master. tests/quotas/store/test_redis_sentinel.py.
"""

import asyncio
import contextlib
import logging
import time

logger = logging.getLogger("quotas")

CHECK_SECONDS = 1.0


class MasterFollower:
    def __init__(self, pool, errors):
        """`pool`: the store's SentinelConnectionPool; `errors`: what a failed sentinel query raises."""
        self.pool = pool
        self.errors = errors
        self.master = None  # (host, port) as last seen
        self.next_check = 0.0
        self.task = None

    def poke(self):
        """Before each command: start a check if one is due, and never wait for it."""
        now = time.monotonic()
        if now < self.next_check or (self.task is not None and not self.task.done()):
            return
        self.next_check = now + CHECK_SECONDS
        self.task = asyncio.get_running_loop().create_task(self.check())

    async def check(self):
        try:
            master = await self.pool.get_master_address()
        except self.errors:
            return  # no sentinel answers, or none names a master: new connections fail and say so; old ones may work
        if self.master is not None and master != self.master:
            logger.warning("the Redis master moved from %s to %s: leaving the old one", self.master, master)
            await self.pool.disconnect(inuse_connections=False)
            await self.pool.update_active_connections_for_reconnect()
        self.master = master

    async def aclose(self):
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
