"""The ASGI handler for /v1/: Django's, with the API's own middleware chain and no thread hops per request."""

import asyncio
from contextlib import closing

from django.conf import UserSettingsHolder, settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix


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

    async def __call__(self, scope, receive, send):
        # Without Django's per-request ThreadSensitiveContext, which starts a thread for each request: the API
        # runs its queries on quotas/domain/db.py's threads.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """ASGIHandler.handle (Django 6.1, DJANGO_HANDLE_SHA256 below) with its two thread hops taken out.

        Django sends request_started with `asend`, which runs the sync receivers on a worker thread, and closes
        the response with `sync_to_async(response.close)`, which sends request_finished there too: two hops per
        request, the first one before the middleware, on the way to the first token (docs/performance.md). Here
        both signals are sent, to the same receivers, from the event loop's thread. Django's own receivers act on
        the calling thread's database connections and caches (close_old_connections, reset_queries,
        close_caches), of which the loop's thread has none: the API's queries run on quotas/domain/db.py's threads,
        which check their connections themselves. A receiver added to these signals must not block.
        """
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        with closing(body_file):
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                body_file.close()
                await self.send_response(error_response, send)
                error_response.close()
                return
            response = None
            try:
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self.listen_for_disconnect(receive))
                        response = await self.run_get_response(request)
                        await self.send_response(response, send)
                        raise _RequestProcessed
                except* (_RequestProcessed, RequestAborted):
                    pass
            except BaseExceptionGroup as exception_group:
                if len(exception_group.exceptions) == 1:
                    raise exception_group.exceptions[0]
                raise
            if response is None:
                signals.request_finished.send(sender=self.__class__)
            else:
                response.close()


class _RequestProcessed(Exception):
    """Ends APIHandler.handle's task group once the response is sent (Django's RequestProcessed)."""


# The source of the ASGIHandler.handle that APIHandler.handle mirrors: tests/streaming/gateway/test_handler.py fails when an upgraded
# Django changes it, so that the copy is read against the new one.
DJANGO_HANDLE_SHA256 = "c91f27c7fcdc3fff4f1c7082e91cb30f0bfaa5781ca632a116b1d9e607fd752a"
