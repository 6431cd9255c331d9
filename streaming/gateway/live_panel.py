"""The admin's live panel: the streams running now, pushed to staff over a WebSocket.

Daphne's WebSocket sends have no flow control (django/daphne#170): whatever is sent to a tab that
stopped reading stays in server memory. So the panel sends one small coalesced snapshot per
`interval_seconds`, never a message per token, and the page acknowledges each one. With `window`
snapshots unacknowledged the consumer skips ticks (the next snapshot supersedes them); after
`stall_seconds` without an acknowledgement it closes the socket with 4408.

Where the rows come from: each process keeps its running streams in `streaming.telemetry.live`. A consumer
reads its own process's registry directly, and every process with subscribers or running streams
publishes its snapshot to the channel-layer group GROUP once a second; a consumer merges the latest
snapshot of each other process, dropping a process silent for `stale_seconds`. The in-memory
channel layer has one process; with channels_redis (REDIS_URL) the group spans them all.
"""

import asyncio
import logging
import os
import socket
import time

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from streaming.telemetry import live, metrics

logger = logging.getLogger(__name__)

GROUP = "sluice.live"
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
MAX_ROWS = 200  # the busiest streams only, to keep every message small
FORBIDDEN = 4403
TOO_SLOW = 4408


def busiest(rows):
    return sorted(rows, key=lambda row: row["tokens"], reverse=True)


class Publisher:
    """This process's part of GROUP: its snapshot once a second, while it has streams or subscribers."""

    interval_seconds = 1.0

    def __init__(self):
        self.subscribers = 0
        self.task = None

    def ensure_running(self):
        """Publish from the running event loop unless already publishing there (idempotent, cheap)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # registered from sync code (tests): nothing to publish from
            return
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self.run())

    async def run(self):
        layer = get_channel_layer()
        while self.subscribers or live.active:
            try:
                await layer.group_send(GROUP, {"type": "live.snapshot", "process": PROCESS_ID,
                                               "streams": busiest(live.snapshot())[:MAX_ROWS]})
            except Exception:  # the channel layer is down: this process's own panels still work
                logger.warning("could not publish the live snapshot", exc_info=True)
            await asyncio.sleep(self.interval_seconds)


publisher = Publisher()
live.listeners.append(publisher.ensure_running)


@database_sync_to_async
def may_watch(user):
    return bool(user is not None and user.is_active and user.is_staff and user.has_perm("quotas.view_usage"))


class LiveConsumer(AsyncJsonWebsocketConsumer):
    interval_seconds = 1.0
    window = 3  # snapshots sent and not yet acknowledged
    stall_seconds = 30.0
    stale_seconds = 3.0

    async def connect(self):
        if not await may_watch(self.scope.get("user")):
            await self.close(code=FORBIDDEN)  # before accept(): the handshake is refused
            return
        self.remote = {}  # process id -> (monotonic time received, rows)
        self.sent = self.acked = 0
        self.unacked_since = None
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        publisher.subscribers += 1
        metrics.LIVE_PANEL_CLIENTS.inc()
        publisher.ensure_running()
        self.ticker = asyncio.create_task(self.tick())

    async def disconnect(self, code):
        ticker = getattr(self, "ticker", None)
        if ticker is None:  # refused at connect
            return
        ticker.cancel()
        publisher.subscribers -= 1
        metrics.LIVE_PANEL_CLIENTS.dec()
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive_json(self, content, **kwargs):
        seq = content.get("ack") if isinstance(content, dict) else None
        if isinstance(seq, int) and self.acked < seq <= self.sent:
            self.acked = seq
            self.unacked_since = None if seq == self.sent else time.monotonic()

    async def live_snapshot(self, message):
        if message["process"] != PROCESS_ID:
            self.remote[message["process"]] = (time.monotonic(), message["streams"])

    async def tick(self):
        try:
            while True:
                now = time.monotonic()
                if self.unacked_since is not None and now - self.unacked_since > self.stall_seconds:
                    logger.info("closing a live panel that acknowledged nothing for %.0f s", self.stall_seconds)
                    metrics.LIVE_PANEL_DROPPED.inc()
                    await self.close(code=TOO_SLOW)
                    return
                if self.sent - self.acked < self.window:
                    await self.send_snapshot(now)
                await asyncio.sleep(self.interval_seconds)
        except Exception:  # a task's error would otherwise go unseen, and the panel silent
            logger.exception("the live panel failed")
            await self.close(code=1011)

    async def send_snapshot(self, now):
        self.remote = {p: (at, rows) for p, (at, rows) in self.remote.items() if now - at <= self.stale_seconds}
        rows = busiest(live.snapshot() + [row for _, rows in self.remote.values() for row in rows])
        self.sent += 1
        if self.unacked_since is None:
            self.unacked_since = now
        await self.send_json({"type": "snapshot", "seq": self.sent, "at": time.time(),
                              "processes": 1 + len(self.remote), "total": len(rows), "streams": rows[:MAX_ROWS]})


# The WebSocket routes (config/asgi.py mounts `websocket_application`). The session identifies the user
# (AuthMiddlewareStack); the Origin must be one of ALLOWED_HOSTS, so another site cannot open the socket with an
# operator's cookies; the consumer admits staff only.
websocket_urlpatterns = [
    path("ws/admin/live/", LiveConsumer.as_asgi(), name="admin-live"),
]
websocket_application = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
