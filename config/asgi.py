"""ASGI entry point: HTTP to Django (and, with no provider configured, /_sim to the simulated
upstream, served by this same process); WebSockets to the staff-only live usage consumer."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from django.conf import UserSettingsHolder, settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402


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
        # runs its queries on quotas/db.py's threads, and what is left for a "thread-sensitive" thread (the
        # request_started/finished signal receivers) runs on asgiref's one long-lived thread.
        await self.handle(scope, receive, send)


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
