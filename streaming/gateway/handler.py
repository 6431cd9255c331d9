"""The ASGI handler for /v1/: Django's, with the API's own middleware chain and no per-request thread or thread hop."""

import asyncio
from contextlib import closing

from asgiref.sync import sync_to_async
from django.conf import UserSettingsHolder, settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import connections
from django.urls import set_script_prefix

from streaming.gateway import loop_gate


class APIHandler(ASGIHandler):
    """Serves /v1/ with settings.API_MIDDLEWARE instead of settings.MIDDLEWARE.

    Bearer-token requests need none of the browser middleware (sessions, auth, CSRF, messages), and
    each of those is sync-only: two thread hops per request apiece, the largest part of a request's
    CPU cost (docs/performance.md). Django builds a handler's chain from settings once, at start-up.
    """

    def load_middleware(self, is_async=False):
        # What django.test's override_settings does, without importing the test framework (~2 MB per process).
        holder = UserSettingsHolder(settings._wrapped)
        holder.MIDDLEWARE = settings.API_MIDDLEWARE
        settings._wrapped, project_settings = holder, settings._wrapped
        try:
            super().load_middleware(is_async)
        finally:
            settings._wrapped = project_settings

    def __init__(self):
        super().__init__()
        self.gate = loop_gate.from_settings()

    async def __call__(self, scope, receive, send):
        # Running streams first: a request waits here while the event loop lags (loop_gate.py), in its caller's
        # queue; the probes do not.
        if scope["path"].startswith("/v1/") and not self.gate.passes():
            await self.gate.wait(_caller(scope))
        # Without Django's per-request ThreadSensitiveContext, which starts a thread for each request: the API
        # runs its queries on quotas/domain/db.py's threads.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """ASGIHandler.handle (Django 6.1, DJANGO_HANDLE_SHA256 below) with its two thread hops taken out.

        Django sends request_started with `asend`, which runs the sync receivers on a worker thread, and closes
        the response with `sync_to_async(response.close)`, which sends request_finished there too: two hops per
        request, the first one before the middleware, on the way to the first token; and it defines an exception
        class per request and ends its task group with an exception (each a reference cycle, which holds the
        request's objects until the cyclic collector runs). Here both signals are sent, to the same receivers, from
        the event loop's thread, and the disconnect listener cancels the view without a task group (below).
        Django's own receivers act on the calling thread's database connections and caches
        (close_old_connections, reset_queries, close_caches), of which the loop's thread has none: the API's
        queries run on quotas/domain/db.py's threads, which check their connections themselves. A receiver added
        to these signals must not block. Why the copy is back: docs/performance.md, "Session 15".
        """
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        # The receivers run here only if this thread holds no database connection, as a server's event loop thread
        # does not. One that does — `manage.py runserver`'s (its migration check), a test's calling the application
        # — gets Django's way, the receivers on a worker thread: close_old_connections would otherwise close its
        # connection from async code, which Django refuses (SynchronousOnlyOperation).
        here = not connections.all(initialized_only=True)
        with closing(body_file):
            set_script_prefix(get_script_prefix(scope))
            if here:
                signals.request_started.send(sender=self.__class__, scope=scope)
            else:
                await signals.request_started.asend(sender=self.__class__, scope=scope)
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                body_file.close()
                await self.send_response(error_response, send)
                await self._finished(error_response, here)
                return
            response = None
            # Django's TaskGroup, without its exceptions: the view and the response run in this task while another
            # listens for the client's disconnect, which cancels them. Django ends its group by raising an
            # exception through it and catching the group's with `except*`: the group, its traceback and this
            # frame (the request and the response) then form a reference cycle (Python 3.13), left to the
            # collector, for every request, and the raise costs ~11 µs.
            task, failure, running = asyncio.current_task(), None, True

            def listened(listener):
                nonlocal failure
                # (A done callback already scheduled when the view returned still runs: `running` says it is late.)
                if running and not listener.cancelled() and listener.exception() is not None:
                    failure = listener.exception()  # RequestAborted: the client disconnected
                    task.cancel()

            listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
            listener.add_done_callback(listened)
            try:
                response = await self.run_get_response(request)
                await self.send_response(response, send)
            except asyncio.CancelledError:
                if failure is None or task.uncancel() > 0:
                    raise  # cancelled from outside (the server's shutdown, for one), as with Django's group
                if not isinstance(failure, RequestAborted):
                    raise failure from None
            finally:
                running = False
                listener.remove_done_callback(listened)
                listener.cancel()
                failure = listener = None
            await self._finished(response, here)

    async def _finished(self, response, here):
        """request_finished: sent by `response.close()`, or by itself if there is no response (Django's order)."""
        if response is None:
            if here:
                signals.request_finished.send(sender=self.__class__)
            else:
                await signals.request_finished.asend(sender=self.__class__)
        elif here:
            response.close()
        else:
            await sync_to_async(response.close)()


def _caller(scope) -> bytes:
    """Whose queue a waiting request joins at the loop gate: its credentials as sent (nothing is looked up)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value
    return b""


# The source of the ASGIHandler.handle that APIHandler.handle mirrors: tests/streaming/gateway/test_handler.py fails
# when an upgraded Django changes it, so that the copy is read against the new one.
DJANGO_HANDLE_SHA256 = "c91f27c7fcdc3fff4f1c7082e91cb30f0bfaa5781ca632a116b1d9e607fd752a"
