"""The ASGI handler for /v1/: Django's, with the API's own middleware chain and no per-request thread."""

from django.conf import UserSettingsHolder, settings
from django.core.handlers.asgi import ASGIHandler


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
