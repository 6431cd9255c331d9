"""Probes for load balancers and orchestrators, without authentication.

`/healthz`: the process is up and serving requests; it touches neither the database nor the counter store (a
database outage must not make an orchestrator restart every process). `/readyz`: the database and the counter store
both answer within CHECK_TIMEOUT_SECONDS, else 503 naming the one that does not. config/asgi.py serves both through
the API's handler: no session, CSRF or host checks, no per-request thread.
"""

import asyncio
import logging
import time

from django.db import connection
from django.http import JsonResponse

from quotas.domain import db
from quotas.store import get_store

from .views import api_view

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
CHECK_TIMEOUT_SECONDS = 2.0
logger = logging.getLogger(__name__)


@api_view(["GET", "HEAD"])
async def healthz(request):
    return JsonResponse({"status": "ok"})


@api_view(["GET", "HEAD"])
async def readyz(request):
    database, store = await asyncio.gather(_probe("database", _select_one), _probe("counter_store", _peek_store))
    checks = {"database": database, "counter_store": store}
    ready = all(state == "ok" for state in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


# One check of each kind in flight per process: probes arriving while a check hangs (a database that does not answer
# its connect) share it instead of piling more jobs onto the database threads.
_pending = {}


async def _probe(name, check) -> str:
    pending = _pending.get(name)
    if pending is None or pending.done():
        pending = _pending[name] = asyncio.ensure_future(check())
    try:
        await asyncio.wait_for(asyncio.shield(pending), CHECK_TIMEOUT_SECONDS)
    except Exception as error:  # refused, timed out, misconfigured: not ready, whatever the cause
        logger.warning("readiness: the %s does not answer (%s)", name.replace("_", " "), type(error).__name__)
        return "unavailable"
    return "ok"


async def _select_one():
    def select():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    # On the gateway's own database threads: the connection the requests use, healed as theirs are.
    await db.run(select)


async def _peek_store():
    # A read that counts nothing (what the rate headers use), on a key of its own.
    await get_store().peek_rate("sluice:readyz", 1, 60.0, time.time())
