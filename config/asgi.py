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

from urllib.parse import urlsplit  # noqa: E402

from channels.routing import ProtocolTypeRouter  # noqa: E402  (after Django is set up)
from django.conf import settings  # noqa: E402

from streaming.gateway.health import PROBE_PATHS  # noqa: E402
from streaming.provider import client as provider  # noqa: E402
from streaming.simulator.app import Simulator  # noqa: E402

# The in-process simulated provider's switches and stats need SIMULATOR_CONTROL_TOKEN (read at each request; unset:
# off). The standalone `python -m streaming.simulator` leaves them open.
simulator_application = Simulator(control_token=lambda: settings.SIMULATOR_CONTROL_TOKEN)


def _origin_form(scope):
    """The scope of an absolute-form request target (`GET http://host/v1/models HTTP/1.1`, which HTTP/1.1 servers
    must accept) with the path alone, as the routes know it: Daphne passes the whole URL on as the path.

    The Host header is left as the client sent it: only the path decides which application answers. None: the
    target is not a URL at all (answered 400).
    """
    if scope["path"].startswith("/"):  # origin form: nearly every request, and nothing to parse
        return scope
    try:
        target = urlsplit(scope["path"])
        raw_path = scope.get("raw_path")
        if raw_path:
            raw_path = urlsplit(raw_path).path or b"/"
    except ValueError:  # not a URL at all (`http://[::1/v1/models`: an unclosed IPv6 literal)
        return None
    if target.scheme.lower() not in ("http", "https") or not target.netloc:
        return scope
    return dict(scope, path=target.path or "/", raw_path=raw_path)


async def _route(scope, receive, send):
    path = scope["path"]
    # The probes too: no session, CSRF or host checks, no per-request thread (a load balancer probes by address).
    if path.startswith("/v1/") or path in PROBE_PATHS:
        return await api_application(scope, receive, send)
    if provider.uses_simulator() and path.startswith(provider.SIMULATOR_PREFIX + "/"):
        scope = dict(scope, root_path=scope.get("root_path", "") + provider.SIMULATOR_PREFIX)
        return await simulator_application(scope, receive, send)
    return await django_application(scope, receive, send)


from streaming.gateway.intake import Intake  # noqa: E402

# The request id, the API key and the body's size are settled before the body is read (streaming/gateway/intake.py).
_intake = Intake(_route)


async def http_application(scope, receive, send):
    target = _origin_form(scope)
    if target is None:
        return await _bad_target(scope, send)
    return await _intake(target, receive, send)


async def _bad_target(scope, send):
    import json
    import uuid

    body = json.dumps({"error": {"message": "The request target is not a valid URL.", "type": "invalid_request_error",
                                 "param": None, "code": "bad_request"}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", f"req_{uuid.uuid4().hex}".encode())]})
    await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})


from streaming.gateway.live_panel import websocket_application  # noqa: E402



async def lifespan_application(scope, receive, send):
    """ASGI lifespan, which Uvicorn speaks (Daphne does not; Sluice's server does the same in its run()): once the
    application is loaded and before the first request, the server process's collector policy
    (streaming/server/collector.py) and its CPUs (SLUICE_CPUS, streaming/server/affinity.py: a list it cannot run on
    fails the start-up, and Uvicorn exits with the reason)."""
    from streaming.server import affinity, collector

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                affinity.configure()
            except affinity.AffinityError as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            collector.configure()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter({"http": http_application, "websocket": websocket_application,
                                  "lifespan": lifespan_application})
