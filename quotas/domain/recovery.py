"""Requests whose serving process died (SIGKILL, a lost machine): settled by a live process.

A running request's ledger row carries a heartbeat and its progress (the completion tokens it has sent), written
as it leases more tokens and at each renewal of its lease (every QUOTA_SLOT_TTL / 3). A row silent for longer than
QUOTA_SLOT_TTL belongs to a process that stopped: any live process claims it (one wins, ledger.claim_abandoned),
settles it as `worker_lost` charging its prompt and its last recorded progress, and charges the user's windows in
the counter store, where the dead process's lease has expired meanwhile. Each process looks every
QUOTA_SLOT_TTL / 3 while it serves requests, so a dead process's rows are settled within about 4/3 × QUOTA_SLOT_TTL
of its last heartbeat, and at most one lease block of delivered tokens goes unbilled per stream (docs/quotas.md).
"""

import asyncio
import logging
import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from . import ledger
from .exceptions import CounterStoreDown
from .leases import TokenLease
from .money import cost_nanos, price_from_record
from .selectors import limits_of

logger = logging.getLogger("quotas")


async def settle_abandoned() -> int:
    """Settle every row whose process went silent; returns how many this process settled."""
    silent_since = timezone.now() - timedelta(seconds=settings.QUOTA_SLOT_TTL)
    rows = await ledger.claim_abandoned(silent_since)
    for row in rows:
        charged, cost, charged_nanos = await _charge_windows(row)
        await ledger.set_charged(row.pk, charged, cost, charged_nanos)
        logger.warning("settled %s of a lost process: %d of %d tokens charged", row.request_id, charged,
                       row.owed_tokens)
    return len(rows)


async def _charge_windows(row) -> int:
    """Charge the row's day and month windows what it owes, as far as they still allow: the dead process's lease
    expired before its row was claimed, and other requests may have leased that room meanwhile — a window is never
    taken past its limit, even then (what is not charged stays in the ledger's token counts). A lease of the owed
    tokens under the user's limits, then settled: the store's two atomic operations; a missing window is rebuilt
    from the ledger first, where the claimed row counts nothing yet.

    At a priced model (the row keeps its price from admission) the money windows too: the owed tokens leased at the
    output rate, charged the row's cost as far as that lease covers it. Returns (tokens charged, cost, nanos
    charged)."""
    price = price_from_record(row.price)
    lease = TokenLease(row.user_id, await limits_of(row.user_id, row.api_key_id), row.request_id, row.started_at,
                       price, key_id=row.api_key_id)
    cost = cost_nanos(price, row.prompt_tokens, row.completion_tokens)
    try:
        granted = await lease.top_up(row.owed_tokens)
    except CounterStoreDown:
        # Not charged, never over: the ledger keeps what it owed (its token counts), the windows do not count it.
        logger.error("could not charge %s's windows for %s: the counter store is down", row.user_id, row.request_id)
        return 0, cost, None if cost is None else 0
    charged_nanos = lease.charges(granted, cost)[1]
    await lease.settle(granted, cost)
    return granted, cost, charged_nanos


class Reaper:
    """This process's periodic look for rows of lost processes, while it serves requests."""

    def __init__(self):
        self.task = None
        self.last_request = 0.0

    def ensure_running(self):
        """Called on each admission: start (or keep) the loop in the running event loop. Cheap."""
        self.last_request = time.monotonic()
        if self.task is None or self.task.done() or self.task.get_loop() is not asyncio.get_running_loop():
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self):
        interval = settings.QUOTA_SLOT_TTL / 3
        # Stop after a quiet while (a process that serves nothing need not look); the next request restarts it.
        while time.monotonic() - self.last_request < 10 * settings.QUOTA_SLOT_TTL:
            try:
                await settle_abandoned()
            except Exception:  # the database is down: try again next time
                logger.warning("could not look for rows of lost processes", exc_info=True)
            await asyncio.sleep(interval)


reaper = Reaper()
