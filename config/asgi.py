"""ASGI entry point: HTTP to Django (and, with no provider configured, /_sim to the simulated
upstream, served by this same process); WebSockets to the staff-only live usage consumer."""

import asyncio
import os
from contextlib import closing

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from django.conf import UserSettingsHolder, settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402


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
        # runs its queries on quotas/db.py's threads.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """ASGIHandler.handle (Django 6.1, DJANGO_HANDLE_SHA256 below) with its two thread hops taken out.

        Django sends request_started with `asend`, which runs the sync receivers on a worker thread, and closes
        the response with `sync_to_async(response.close)`, which sends request_finished there too: two hops per
        request, the first one before the middleware, on the way to the first token (docs/performance.md). Here
        both signals are sent, to the same receivers, from the event loop's thread. Django's own receivers act on
        the calling thread's database connections and caches (close_old_connections, reset_queries,
        close_caches), of which the loop's thread has none: the API's queries run on quotas/db.py's threads,
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


# The source of the ASGIHandler.handle that APIHandler.handle mirrors: tests/test_asgi.py fails when an upgraded
# Django changes it, so that the copy is read against the new one.
DJANGO_HANDLE_SHA256 = "c91f27c7fcdc3fff4f1c7082e91cb30f0bfaa5781ca632a116b1d9e607fd752a"


api_application = APIHandler()


def _refuse_misconfiguration():
    """Daphne's and Uvicorn's command lines run no system checks: run Sluice's here (runserver loads this module too).

    Only Sluice's own (the environment's settings): Django's whole suite imports ~4 MB of modules a server does not
    otherwise need, and `manage.py check` (and runserver) run it. The secret key is checked here rather than for
    every management command: a server needs it, `migrate` does not.
    """
    from django.core import checks

    from streaming.checks import SLUICE, check_secret_key

    errors = [e for e in [*checks.run_checks(tags=[SLUICE], include_deployment_checks=False), *check_secret_key()]
              if e.is_serious()]
    if errors:
        raise SystemExit("Sluice will not start:\n" + "\n".join(f"  {e}" for e in errors))


_refuse_misconfiguration()

from channels.routing import ProtocolTypeRouter  # noqa: E402  (after Django is set up)

from streaming import simulator, upstream  # noqa: E402


async def http_application(scope, receive, send):
    path = scope["path"]
    if path.startswith("/v1/"):
        return await api_application(scope, receive, send)
    if upstream.uses_simulator() and path.startswith(upstream.SIMULATOR_PREFIX + "/"):
        scope = dict(scope, root_path=scope.get("root_path", "") + upstream.SIMULATOR_PREFIX)
        return await simulator.application(scope, receive, send)
    return await django_application(scope, receive, send)


def _websocket_application():
    try:
        from quotas.routing import websocket_application
    except ImportError:  # the live panel is optional
        return None
    return websocket_application


routes = {"http": http_application}
if (ws := _websocket_application()) is not None:
    routes["websocket"] = ws
application = ProtocolTypeRouter(routes)
