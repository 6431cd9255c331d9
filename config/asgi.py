"""ASGI entry point: HTTP to Django (and, with no provider configured, /_sim to the simulated
upstream, served by this same process); WebSockets to the staff-only live usage consumer."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from streaming.gateway.handler import APIHandler  # noqa: E402

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

from streaming.provider import client as provider  # noqa: E402
from streaming.simulator.app import application as simulator_application  # noqa: E402


async def http_application(scope, receive, send):
    path = scope["path"]
    if path.startswith("/v1/"):
        return await api_application(scope, receive, send)
    if provider.uses_simulator() and path.startswith(provider.SIMULATOR_PREFIX + "/"):
        scope = dict(scope, root_path=scope.get("root_path", "") + provider.SIMULATOR_PREFIX)
        return await simulator_application(scope, receive, send)
    return await django_application(scope, receive, send)


from streaming.gateway.live_panel import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": http_application, "websocket": websocket_application})
