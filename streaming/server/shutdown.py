"""SIGTERM drains instead of cutting every stream at once: for a rolling deploy.

On SIGTERM (or SIGINT) Twisted stops its reactor, and before it does Daphne cancels every running application (its
`kill_all_applications`, a "before shutdown" trigger). `DrainingServer` puts a drain in front of that: it stops
accepting connections, lets the requests in progress finish for up to SHUTDOWN_DRAIN_SECONDS (30 by default) — a
request still arriving counts, and so does a connection accepted within ACCEPT_GRACE_SECONDS whose request has not
begun (a rolling restart of a fleet, fleet.py, would otherwise drop the last connections it accepted) — then
calls the `hooks` the application registered (Sluice's ends each stream still running with a final error event and
settles it: streaming/apps.py), gives them a few seconds, and only then lets Daphne cancel what is left.

SHUTDOWN_DRAIN_SECONDS is read from the environment when the drain starts, like SLUICE_EVENT_LOOP (reactor.py): the
server may serve an application that has no Django settings.
"""

import asyncio
import logging
import os
import time

from twisted.internet import defer

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_SECONDS = 30.0
# After the hooks: how long the ended streams get to write their last event and settle.
HOOKS_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05
# A connection accepted this recently when the drain starts gets this long (from its acceptance) for its request line
# to arrive; a connection that sends nothing for longer (an idle pre-connection) is closed with the process.
ACCEPT_GRACE_SECONDS = 1.0

# Async callables, awaited once when the drain deadline passes with requests still running.
hooks: list = []


def drain_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("SHUTDOWN_DRAIN_SECONDS", "") or DEFAULT_DRAIN_SECONDS))
    except ValueError:
        return DEFAULT_DRAIN_SECONDS


class DrainingServer:
    """A mixin for Daphne's `Server`: drain before Daphne kills the applications."""

    def listen_success(self, port):
        self.__dict__.setdefault("_listening_ports", []).append(port)
        return super().listen_success(port)

    def kill_all_applications(self):
        drained = defer.Deferred.fromFuture(asyncio.ensure_future(self.drain()))
        drained.addErrback(lambda failure: logger.error("the drain failed: %s", failure.getErrorMessage()))
        drained.addCallback(lambda _: super(DrainingServer, self).kill_all_applications())
        return drained

    async def drain(self):
        for port in self.__dict__.get("_listening_ports", []):
            port.stopListening()  # new connections are refused; running ones go on
        deadline = time.monotonic() + drain_seconds()
        running = self._running_requests()
        logger.info("draining: %d requests running, up to %.0f s", len(running), drain_seconds())
        await self._until_done(deadline)
        if self._running_requests():
            for hook in hooks:
                try:
                    await hook()
                except Exception:
                    logger.exception("a shutdown hook failed")
            await self._until_done(time.monotonic() + HOOKS_GRACE_SECONDS)
        logger.info("drained: %d requests still running are cancelled", len(self._running_requests()))

    async def _until_done(self, deadline):
        while self._running_requests() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)

    def _running_requests(self):
        """The HTTP requests in progress: still arriving, or whose application has not returned (WebSocket consumers
        never do: not waited for); and the connections just accepted whose request has not begun."""
        from daphne.http_protocol import WebRequest

        requests = [protocol for protocol, details in list(self.connections.items())
                    if isinstance(protocol, WebRequest) and _in_progress(protocol, details)]
        return requests + self._awaiting_request()

    def _awaiting_request(self):
        """Connections accepted in the last ACCEPT_GRACE_SECONDS whose request has not begun (none are accepted once
        the drain has stopped listening, so this empties within that grace)."""
        awaiting = getattr(self.http_factory, "awaiting_request", None)
        return [] if awaiting is None else awaiting(time.monotonic() - ACCEPT_GRACE_SECONDS)


def _in_progress(request, details) -> bool:
    instance = details.get("application_instance")
    if instance is None:  # its headers or body are still arriving
        return not request.finished and request.channel is not None
    return not instance.done()
